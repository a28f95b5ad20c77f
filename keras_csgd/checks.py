"""Argument validators: one rule per kind of argument, one message format.

Every public function of the package checks its arguments with these, so
that the same kind of argument is accepted (and refused) the same way
everywhere: numbers are Python or NumPy reals, never `bool`; the message
names the argument in backticks, states the rule and ends with
`Received: name=value`.
"""

from __future__ import annotations

import numbers
import warnings

import numpy as np


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def number(name: str, value, low: float | None = None,
           high: float | None = None, low_open: bool = False,
           high_open: bool = False) -> float:
    """Checks that `value` is a real number (not `bool`) in an interval.

    Args:
        name: the argument's name, for the message.
        value: the value to check.
        low: the lower bound. Defaults to `None` (none).
        high: the upper bound. Defaults to `None` (none).
        low_open: exclude `low`. Defaults to `False`.
        high_open: exclude `high`. Defaults to `False`.

    Returns:
        `value` as a float.

    Raises:
        ValueError: `value` is not a real number in the interval.

    Example:

    ```python
    checks.number("decay", decay, 0, 0.75, low_open=True, high_open=True)
    ```
    """
    ok = _is_real(value) and not np.isnan(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        if high is None:
            rule = f"a number {'>' if low_open else '>='} {low}"
        else:
            rule = (f"a number in {'(' if low_open else '['}{low}, {high}"
                    f"{')' if high_open else ']'}")
        raise ValueError(
            f"`{name}` must be {rule}. Received: {name}={value!r}"
        )
    return float(value)


def fraction(name: str, value, low_open: bool = True,
             high_closed: bool = True) -> float:
    """`number(name, value, 0, 1, ...)`, the message naming a fraction.

    `low_open` excludes 0 and `high_closed` includes 1 (both by default:
    `(0, 1]`, a kept fraction such as `keep`).

    Raises:
        ValueError: `value` is not a real number in the interval.

    Example:

    ```python
    checks.fraction("rate", rate, low_open=False, high_closed=False)
    ```
    """
    try:
        return number(name, value, 0, 1, low_open, not high_closed)
    except ValueError:
        interval = (("(" if low_open else "[") + "0, 1"
                    + ("]" if high_closed else ")"))
        raise ValueError(
            f"`{name}` must be a fraction in {interval}. "
            f"Received: {name}={value!r}"
        ) from None


def positive_int(name: str, value, allow_none: bool = False) -> int | None:
    """Checks that `value` is an int `>= 1` (or `None` when allowed).

    Args:
        name: the argument's name, for the message.
        value: the value to check (`bool` is refused).
        allow_none: accept `None` too. Defaults to `False`.

    Returns:
        `value`.

    Raises:
        ValueError: `value` is not a positive int.

    Example:

    ```python
    checks.positive_int("round_to", round_to, allow_none=True)
    ```
    """
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or (
        value < 1
    ):
        rule = "a positive int or None" if allow_none else "a positive int"
        raise ValueError(
            f"`{name}` must be {rule}. Received: {name}={value!r}"
        )
    return int(value)


def choice(name: str, value, choices) -> object:
    """Checks that `value` is one of `choices`.

    Args:
        name: the argument's name, for the message.
        value: the value to check.
        choices: the accepted values.

    Returns:
        `value`.

    Raises:
        ValueError: `value` is not among `choices`.

    Example:

    ```python
    checks.choice("norm", norm, ("l1", "l2"))
    ```
    """
    if value not in tuple(choices):
        raise ValueError(
            f"`{name}` must be one of {list(choices)}. "
            f"Received: {name}={value!r}"
        )
    return value


def renamed(config: dict, names: dict, who: str) -> dict:
    """A saved config with arguments renamed since it was saved.

    Args:
        config: the `get_config()` dict, as loaded.
        names: `{old_name: new_name}`.
        who: the class, for the warning.

    Returns:
        A copy of `config` under the new names; a `DeprecationWarning`
        names each old one found.

    Raises:
        ValueError: a config holding both an old name and its new one.

    Example:

    ```python
    config = checks.renamed(config, {"keep_prob": "mask_keep"},
                            "FilterEnsembles")
    ```
    """
    config = dict(config)
    for old, new in names.items():
        if old not in config:
            continue
        if new in config:
            raise ValueError(
                f"A {who} config holds both `{old}` and `{new}` (its new "
                f"name). Received: {old}={config[old]!r}, "
                f"{new}={config[new]!r}"
            )
        warnings.warn(
            f"{who} config: `{old}` is now called `{new}`; loaded as "
            f"{new}={config[old]!r}.",
            DeprecationWarning,
            stacklevel=3,
        )
        config[new] = config.pop(old)
    return config
