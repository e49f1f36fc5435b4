"""Every key the server and the clients exchange, in one place.

Message content (RecordDict) keys, the keys inside them, and the client's Context state key.
"""

WARM_UP = "query.warm_up"  # simulation: a worker loads the shared model before round 1 (server/warm_up.py)
IDENTIFY = "query.identify"  # a node says its client name (server/spending.py)
# After the last round, a client whose last reply never came reports the spending the ledger lacks (server/spending.py)
UNRECORDED_SPENDING = "query.unrecorded_spending"

# RecordDict keys (the first two are Flower's defaults for FedAvg and friends).
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
CLIENT_INFO = "client"  # ConfigRecord in a reply: who answered and what it did

# ConfigRecord keys sent by the server (besides the flat run config).
SERVER_ROUND = "server-round"  # set by Flower's strategies
PROXIMAL_MU = "proximal-mu"  # set by Flower's FedProx
LEARNING_RATE = "learning-rate"  # this round's client learning rate (train.lr_schedule)
CLIENT_STATE_DIR = "fedtune.client_state_dir"  # simulation: where clients keep their state files
RUN_ID = "fedtune.run_id"  # the run directory's own id: a client files its ledger entries under it
RUN_ID_FILE = "run_id"  # where the run directory keeps it (server/run_dir.py; read by privacy-verify)
# The server's ledger record of this client's spending so far, JSON [[sigma, q, steps], ...]: a client
# whose own state holds less has lost it (client/app.py).
LEDGER_SPENT = "fedtune.ledger_spent"
LEDGER_ROUNDS = "fedtune.ledger_rounds"  # JSON [[round, steps], ...]: the client's entries with steps the ledger holds
CLIPPING_NORM = "clipping_norm"  # Flower's KEY_CLIPPING_NORM: client-side client-level DP clipping
CLIENT_DP = "dp.client_dp"  # the run-config key that tells the client mod fixed from adaptive
SECAGG = "dp.secagg"  # the run-config key that says updates go through SecAgg+
# SecAgg+ (without distributed DP) maps each adapter value in [-SECAGG_CLIPPING_RANGE, SECAGG_CLIPPING_RANGE]
# to SECAGG_QUANTIZATION_RANGE levels by stochastic rounding (Flower's default range, 2^22).
SECAGG_CLIPPING_RANGE = 8.0
SECAGG_QUANTIZATION_RANGE = 2**22
ARRAY_NAMES = "fedtune.array_names"  # SecAgg+ FitIns config: the names of the legacy Parameters, in order

# MetricRecord keys in replies.
NUM_EXAMPLES = "num-examples"  # Flower's default weighting key
TRAIN_LOSS = "train_loss"
EVAL_LOSS = "eval_loss"
EVAL_ACCURACY = "eval_accuracy"
EPSILON = "epsilon"
EPSILON_OTHER = "epsilon_other_accountant"
NOISE_MULTIPLIER = "noise_multiplier"
DISTRIBUTED_MIN_HONEST = "distributed_min_honest"  # distributed DP: σ holds if this many institutions add a share
MAX_GRAD_NORM = "max_grad_norm"
SAMPLE_RATE = "sample_rate"
STEPS = "steps"
DELTA = "delta"
BYTES_UP = "bytes_up"
PEAK_RSS_MB = "peak_rss_mb"  # the client process's peak resident memory so far
PID = "pid"  # which worker process that was (a simulation worker serves many clients)
NORM_BIT = "norm_bit"  # Flower's KEY_NORM_BIT: the update was clipped (adaptive client-side clipping)

# ConfigRecord keys in the CLIENT_INFO reply record.
CLIENT_NAME = "name"
STATUS = "status"
REASON = "reason"  # why a client refused, or failed after training (one line)
ADOPTED_LEDGER_SPENDING = "adopted_ledger_spending"  # 1: the node lost its state and its operator adopted the ledger's
UNRECORDED = "unrecorded"  # JSON: the client's own ledger entries for spending the server's record lacks
POLICY = "policy"  # whose privacy policy the client applied: "node config" or "run config" (privacy/policy.py)
LORA_RANK = "lora_rank"  # heterogeneous ranks: the rank the client trains (the server sends it that rank next)
RAY_NODE = "ray_node"  # simulation: the Ray node (IP and node id) whose worker ran the client
STATUS_TRAINED = "trained"
STATUS_DECLINED = "declined"  # the round would have taken the client past its ε budget
STATUS_REFUSED = "refused"  # the request broke the institution's privacy policy (privacy/policy.py): no training
STATUS_FAILED = "failed"
STATUS_EXCLUDED = "excluded"  # not asked to train: its registered identity is in doubt (server/identity.py)
# Trained (so it spent ε), but the server refused the update (server/validate.py): not aggregated.
STATUS_REJECTED = "rejected"
SECAGG_INFO_PREFIX = "client."  # SecAgg+: CLIENT_INFO entries travel in the legacy FitRes metrics as client.<key>

# Node config keys (Flower sets the first two in simulation).
PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"
NODE_STATE_DIR = "state-dir"  # deployment: where the institution keeps its privacy state
# The institution's own privacy policy (privacy/policy.py): whatever the server asks, never weaker than these.
NODE_EPSILON_BUDGET = "epsilon-budget"  # its own ε cap (tightens dp.epsilon_budget)
NODE_REQUIRE_DP = "require-dp"
NODE_MAX_DELTA = "max-delta"
NODE_MIN_NOISE_MULTIPLIER = "min-noise-multiplier"
NODE_MAX_NOISE_SHARERS = "max-noise-sharers"  # distributed DP: the largest t an institution accepts (0: none)
NODE_ALLOW_REPRODUCIBLE_NOISE = "allow-reproducible-noise"
NODE_ADOPT_LEDGER_SPENDING = "adopt-ledger-spending"  # the operator's reset after the node lost its state
NODE_CLIENT_NAME = "client-name"  # the institution's name: in the ledgers, and its privacy state's file name
NODE_RELEASE_SCORES = "release-scores"  # under DP: send the training loss and validation scores (false: withheld)
NODE_PRIVACY_UNIT = "privacy-unit"  # `user`: refuse a run whose guarantee covers only single records
NODE_LORA_RANK = "lora-rank"  # the institution's own LoRA rank (runs with lora.client_ranks)
# Deployment: the institution's own data file; the rest default to the run's data.* options.
DATA_PATH = "data-path"
DATA_FORMAT = "data-format"
DATA_TEXT_COLUMN = "text-column"
DATA_LABEL_COLUMN = "label-column"
DATA_SEPARATOR = "separator"
DATA_ENCODING = "encoding"
DATA_USER_COLUMN = "user-column"  # whose record each is, in the institution's own file (dp.unit `user`)
DATA_VAL_FRACTION = "val-fraction"  # the share of its own records it keeps for validation (not the run's)

# Context.state key under which a client keeps its privacy state.
CLIENT_STATE = "fedtune.client"
