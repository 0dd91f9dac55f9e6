"""Training on paired shards: the stage loop, Ray Train, checkpoints, the pair stream, eval and calibration."""
