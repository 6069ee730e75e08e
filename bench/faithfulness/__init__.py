"""Faithfulness benchmark: MoRF/LeRF perturbation curves, AOPC and ABPC of this engine's modes
against Captum, Zennit and LXT on the demo models (``python -m bench.faithfulness``)."""
