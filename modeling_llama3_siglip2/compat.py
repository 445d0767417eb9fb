"""The differences between the transformers versions this model runs on (5.17 to 5.24), in one place.

Each difference is read off transformers itself (a field, a function), never off its version number, so a release
that keeps an API keeps working here. Everything else in the model code calls transformers directly.

- The cache: transformers 5.24 renamed `past_key_values` to `cache`, in model outputs, in every model's `forward` and
  in `generate`, and keeps the old keyword (with a warning) until 5.40. Our forwards take `cache`, accept either
  name, and call transformers' models with the name they take.

Hub-travelling: imports only torch and transformers.
"""

import functools
import inspect
import warnings

from transformers.modeling_outputs import BaseModelOutputWithPast

OLD_CACHE_NAME = "past_key_values"
# The name transformers' own outputs and forwards use for the key-value cache.
CACHE_NAME = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else OLD_CACHE_NAME


def cache_kwarg(cache) -> dict:
    """`{name: cache}` under the name this transformers' models and output classes take."""
    return {CACHE_NAME: cache}


def output_cache(outputs):
    """The cache a transformers output carries, read without the renamed field's deprecation warning."""
    return getattr(outputs, CACHE_NAME, None)


def accepts_either_cache_name(function):
    """Let `function`, whose parameter is `cache`, be called with `cache=` or `past_key_values=`.

    Its visible signature names the parameter as this transformers does (`past_key_values` before 5.24), since
    `generate` reads signatures to decide what to pass. Where transformers has renamed it, the old name warns as
    transformers' own models do.
    """
    signature = inspect.signature(function)
    if "cache" not in signature.parameters:
        raise TypeError(f"{function.__qualname__} has no `cache` parameter")
    visible = signature.replace(
        parameters=[p.replace(name=CACHE_NAME) if p.name == "cache" else p for p in signature.parameters.values()]
    )

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        if OLD_CACHE_NAME in kwargs:
            old = kwargs.pop(OLD_CACHE_NAME)
            if kwargs.get("cache") is not None and old is not None:
                raise ValueError("Pass the cache once, as `cache` or as `past_key_values`, not both")
            if CACHE_NAME != OLD_CACHE_NAME and old is not None:
                warnings.warn(
                    f"`past_key_values` is deprecated and will be removed in version 5.40.0 for "
                    f"`{function.__qualname__}`. Use `cache` instead.",
                    FutureWarning,
                    stacklevel=2,
                )
            if kwargs.get("cache") is None:
                kwargs["cache"] = old
        return function(*args, **kwargs)

    wrapper.__signature__ = visible
    return wrapper


__all__ = ["CACHE_NAME", "OLD_CACHE_NAME", "accepts_either_cache_name", "cache_kwarg", "output_cache"]
