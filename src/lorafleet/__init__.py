"""lorafleet — one shared base LLM, many persistent personal models (adapters) on top of it."""

import os as _os

# torch's CPU threads (libgomp): where more threads have run parallel regions than there are cores (the thread
# that loaded the base, the engine's step thread, the adapter loaders each keep their own OpenMP team), libgomp
# stops spinning between regions and every small op pays a futex sleep/wake. A serving step is hundreds of small
# ops (LoRA deltas, norms, adds): on the 2-core test machine 64 rows over 32 adapters ran 288 tok/s with the
# default and 470-490 with ACTIVE + a short spin (docs/results/base_precision.md). ACTIVE keeps the spinning that
# libgomp would do anyway on an unloaded machine; 30000 spins (~1 ms) bound the CPU an idle worker burns.
# Read by libgomp when torch is first imported: set before that, never overriding the user's own values.
for _name, _value in (("OMP_WAIT_POLICY", "ACTIVE"), ("GOMP_SPINCOUNT", "30000")):
    _os.environ.setdefault(_name, _value)

__version__ = "0.1.0"
