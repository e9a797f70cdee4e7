"""What training and inference share at run time: the device and AMP choice, checkpoints, distributed set-up,
the machine a figure came from (machine.py) and `detector env`'s report (environment.py)."""
