"""Argument checks shared by the models, the pipeline and the command line."""

from numbers import Integral


def check_num_tokens(num_tokens, max_num_tokens: int) -> int:
    """Returns `num_tokens` as an int if it is an integer in [1, `max_num_tokens`], else raises a ValueError that
    says so (bools are refused: they are ints to Python, but never a token count)."""
    if not isinstance(num_tokens, Integral) or isinstance(num_tokens, bool) or not 1 <= num_tokens <= max_num_tokens:
        raise ValueError(f"num_tokens must be an int in [1, {max_num_tokens}], got {num_tokens!r}.")
    return int(num_tokens)
