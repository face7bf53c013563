"""Integrations: LISA inside other people's training loops. hf.py (Trainer, TRL), accelerate.py
(hand-written accelerate loops), hf_compat.py (every private transformers / accelerate access)."""
