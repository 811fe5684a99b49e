"""The continual-learning loop: feedback → scheduled personal update (train) → evaluate → gate → live.

It sits above training and evaluation and drives both; see :mod:`lorafleet.continual.schedule`."""
