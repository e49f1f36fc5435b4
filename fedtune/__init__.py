"""fedtune: federated, differentially private LoRA fine-tuning on Flower, peft and Opacus."""

__version__ = "0.1.0"
