"""Argument checks shared by the models, the pipeline and the command line."""

from numbers import Integral, Real


def is_int(value) -> bool:
    """An integer of any type (numpy's included), but not a bool: bools are ints to Python, never a count."""
    return isinstance(value, Integral) and not isinstance(value, bool)


def is_number(value) -> bool:
    """A real number of any type (numpy's included), but not a bool."""
    return isinstance(value, Real) and not isinstance(value, bool)


def check_num_tokens(num_tokens, max_num_tokens: int) -> int:
    """Returns `num_tokens` as an int if it is an integer in [1, `max_num_tokens`], else raises a ValueError that
    says so (bools are refused: they are ints to Python, but never a token count)."""
    if not is_int(num_tokens) or not 1 <= num_tokens <= max_num_tokens:
        raise ValueError(f"num_tokens must be an int in [1, {max_num_tokens}], got {num_tokens!r}.")
    return int(num_tokens)
