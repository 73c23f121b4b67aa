"""Evaluating FlexTok: reconstruction quality per token budget (rate-distortion), metrics and reports."""
