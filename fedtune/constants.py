"""Every key the server and the clients exchange, in one place.

Message content (RecordDict) keys, the keys inside them, and the client's Context state key.
"""

# RecordDict keys (the first two are Flower's defaults for FedAvg and friends).
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
CLIENT_INFO = "client"  # ConfigRecord in a reply: who answered and what it did

# ConfigRecord keys sent by the server (besides the flat run config).
SERVER_ROUND = "server-round"  # set by Flower's strategies
PROXIMAL_MU = "proximal-mu"  # set by Flower's FedProx
CLIENT_STATE_DIR = "fedtune.client_state_dir"  # simulation: where clients keep their state files

# MetricRecord keys in replies.
NUM_EXAMPLES = "num-examples"  # Flower's default weighting key
TRAIN_LOSS = "train_loss"
EVAL_LOSS = "eval_loss"
EVAL_ACCURACY = "eval_accuracy"
EPSILON = "epsilon"
EPSILON_OTHER = "epsilon_other_accountant"
NOISE_MULTIPLIER = "noise_multiplier"
MAX_GRAD_NORM = "max_grad_norm"
SAMPLE_RATE = "sample_rate"
STEPS = "steps"
DELTA = "delta"
BYTES_UP = "bytes_up"

# ConfigRecord keys in the CLIENT_INFO reply record.
CLIENT_NAME = "name"
STATUS = "status"
STATUS_TRAINED = "trained"
STATUS_DECLINED = "declined"  # the round would have taken the client past its ε budget
STATUS_FAILED = "failed"

# Node config keys (Flower sets the first two in simulation).
PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"

# Context.state key under which a client keeps its privacy state.
CLIENT_STATE = "fedtune.client"
