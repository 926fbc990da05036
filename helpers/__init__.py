"""Shared helpers for the Memory Decoder tutorial series.

Each module belongs to one concern and names the notebook that explains it:

* ``helpers.paths``         -- where caches and artifacts live (all notebooks)
* ``helpers.model``         -- loading the base model (notebook 01)
* ``helpers.corpus``        -- the EU-law corpus and other corpora (notebook 01)
* ``helpers.hidden``        -- batched hidden-state extraction (notebook 01)
* ``helpers.datastore``     -- the kNN-LM datastore on disk (notebook 02)
* ``helpers.index``         -- its FAISS index, saved and verified (notebook 02)
* ``helpers.knn``           -- search, p_kNN, interpolation, perplexity (notebook 02)
* ``helpers.evaluation``    -- the cached held-out pass (notebooks 02-03)
* ``helpers.decoder``       -- the MemoryDecoder network (notebook 03)
* ``helpers.train_decoder`` -- sparse kNN targets, loss, training loop (notebook 03)
* ``helpers.finetune``      -- the fine-tuning reference (notebook 03)
* ``helpers.sampling``      -- blending and KV-cached sampling (notebook 04)
* ``helpers.stats``         -- perplexity ratios with a bootstrap interval (notebooks 03-04)
* ``helpers.chat``          -- the chat panel (notebook 05)
* ``helpers.checks``        -- checks for the "try it" exercises
* ``helpers.validate``      -- argument checks that say what to pass (all notebooks)

Importing this package has no side effects: nothing is downloaded or loaded
until you call a function.
"""

__version__ = "0.1.0"
