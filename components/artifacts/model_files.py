"""Names of files in a model directory that the artifact layer must know without loading a model."""

TRAINING_STATE_FILE = "optimizer.pt"  # Adam moments and master weights (training/checkpoint.py)
CHECKPOINT_DIR = "_checkpoints"  # a train stage's in-stage step checkpoints (stages/train.py)
LORA_BASE_FILE = "lora_base.json"  # an adapter's pointer to its base model (training/lora.py)
TRAINING_STATE = (TRAINING_STATE_FILE, CHECKPOINT_DIR)  # needed to train on, not to load a model: never fetched
