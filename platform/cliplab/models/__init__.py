"""Models: open_clip towers by name or inline config (the model never knows about Ray or DeepSpeed)."""
