"""Argument checks shared by the models, the pipeline and the command line."""

from numbers import Integral, Real

import torch


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


def check_generators(generator, batch_size: int, unit: str = "image", hint: str = "") -> list[torch.Generator | None]:
    """`generator` (None, one `torch.Generator` for the whole batch, or a list of one per `unit`) as one per `unit`,
    or a ValueError that says what was expected (`hint` says what the batch is made of)."""
    generators = generator if isinstance(generator, list) else [generator] * batch_size
    if generator is not None and not all(isinstance(one, torch.Generator) for one in generators):
        raise ValueError(f"`generator` must be a torch.Generator or a list of one per {unit}, got {generator!r}.")
    if len(generators) != batch_size:
        raise ValueError(
            f"Got a list of {len(generators)} generators for {batch_size} {unit}s; pass one generator per {unit}"
            f"{hint}, or a single generator."
        )
    return generators
