"""What training and inference share at run time: the device and AMP choice, checkpoints, distributed set-up."""
