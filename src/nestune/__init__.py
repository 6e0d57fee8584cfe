"""nestune: harden open-weight chat LLMs with NeST (Neuron Selective Tuning)."""

import os

# transformers 5 logs generation configs and image-processor fallbacks at WARNING level; nestune prints
# its own progress. Users can still raise the level with TRANSFORMERS_VERBOSITY.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

__version__ = "0.1.0"
