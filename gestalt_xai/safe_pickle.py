"""Restricted unpickling: one allow-list mechanism for every pickle gestalt-xai reads.

Unpickling resolves each global the file names (``module.name``) by importing it, and the REDUCE opcode then calls
it, so a pickle can run any code (Python's ``pickle`` documentation, "Restricting Globals"). gestalt-xai reads two
kinds of pickles, both only with the user's opt-in (``trust_pickle``):

* GM-Arc's whole-module checkpoints (``…_last_model.pth``, :mod:`gestalt_xai.models.checkpoints`), of which only
  the tensors are wanted: :data:`gestalt_xai.models.checkpoints.gmarc_pickle.TENSOR_POLICY` rebuilds tensors and
  plain containers and turns every other global into an inert :class:`Placeholder`;
* GM-Arc's gallery encodings (a pickled pandas DataFrame, :mod:`gestalt_xai.matching.gmarc`): pandas, NumPy and
  builtin containers are resolved, any other global is refused with an error naming it.

Both go through :func:`restricted_unpickler`: a :class:`PicklePolicy` (what may be imported, and what becomes of
anything else) applied in ``find_class``, the one place where unpickling imports.

Examples
--------
>>> import io, pickle
>>> policy = PicklePolicy(names=frozenset({("builtins", "set")}), unknown="refuse", what="sets only")
>>> restricted_unpickler(policy)(io.BytesIO(pickle.dumps({1, 2}))).load()
{1, 2}
>>> restricted_unpickler(policy)(io.BytesIO(pickle.dumps(print))).load()
Traceback (most recent call last):
...
gestalt_xai.errors.InputError: refusing to unpickle builtins.print: sets only
>>> unpickler = restricted_unpickler(PicklePolicy(unknown="placeholder"))(io.BytesIO(pickle.dumps(print)))
>>> issubclass(unpickler.load(), Placeholder), sorted(unpickler.placeholders)
(True, ['builtins.print'])
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from gestalt_xai.errors import InputError

__all__ = ["PY2_MODULES", "Placeholder", "PicklePolicy", "restricted_unpickler"]

#: module names that protocol-2 pickles (``torch.save``'s default) use for what Python 3 calls otherwise
PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg", "UserDict": "collections"}


class Placeholder:
    """Inert stand-in for a class or function a pickle names; it only records what it was given.

    Subclasses are made per global (``type(name, (Placeholder,), {"_qualname": "module.name"})``), so the object
    tree of a pickled ``nn.Module`` survives as placeholders whose ``state`` holds ``_parameters``, ``_buffers`` and
    ``_modules``.
    """

    _qualname = "?"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs, self.state, self.items = args, kwargs, None, []

    @classmethod
    def _new(cls, *args: Any) -> Placeholder:
        obj = object.__new__(cls)
        obj.args, obj.kwargs, obj.state, obj.items = args, {}, None, []
        return obj

    def __new__(cls, *args: Any, **kwargs: Any) -> Placeholder:  # NEWOBJ calls cls.__new__(cls, *args)
        return cls._new(*args)

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __call__(self, *args: Any, **kwargs: Any) -> Placeholder:  # e.g. getattr(cls, "method")(…) in REDUCE
        return Placeholder(*args, **kwargs)

    def __setitem__(self, key: Any, value: Any) -> None:  # dict subclasses (SETITEMS)
        self.items.append((key, value))

    def append(self, value: Any) -> None:  # list subclasses (APPENDS)
        self.items.append((None, value))

    def extend(self, values: Iterable[Any]) -> None:
        self.items.extend((None, v) for v in values)

    def __repr__(self) -> str:
        return f"<placeholder {self._qualname}>"


@dataclass(frozen=True)
class PicklePolicy:
    """Which globals a restricted unpickler resolves (imports), and what becomes of every other one.

    Parameters
    ----------
    names : ``(module, name)`` pairs that are resolved.
    modules : modules any name of which is resolved.
    module_prefixes : module prefixes (``"pandas."``) any name under which is resolved.
    allow : a further test ``allow(module, name)`` (e.g. "a dtype attribute of torch").
    unknown : ``"placeholder"`` (an inert :class:`Placeholder` subclass, its name recorded) or ``"refuse"``
        (raise ``error``).
    what : what the file should contain, for the refusal message.
    error : the exception raised on refusal.
    """

    names: frozenset[tuple[str, str]] = frozenset()
    modules: frozenset[str] = frozenset()
    module_prefixes: tuple[str, ...] = ()
    allow: Callable[[str, str], bool] | None = None
    unknown: Literal["placeholder", "refuse"] = "refuse"
    what: str = ""
    error: type[Exception] = InputError

    def allows(self, module: str, name: str) -> bool:
        return (
            (module, name) in self.names
            or module in self.modules
            or module.startswith(self.module_prefixes)
            or (self.allow is not None and self.allow(module, name))
        )


class _Restricted:
    """``find_class`` of every restricted unpickler (mixed in before a concrete ``pickle`` unpickler class)."""

    policy: ClassVar[PicklePolicy]
    shared_placeholders: ClassVar[set[str] | None] = None
    placeholders: set[str]

    def find_class(self, module: str, name: str) -> Any:
        if not hasattr(self, "placeholders"):
            shared = self.shared_placeholders
            self.placeholders = shared if shared is not None else set()
        module = PY2_MODULES.get(module, module)
        if self.policy.allows(module, name):
            return super().find_class(module, name)  # type: ignore[misc]
        qualname = f"{module}.{name}"
        if self.policy.unknown == "refuse":
            raise self.policy.error(f"refusing to unpickle {qualname}: {self.policy.what}")
        self.placeholders.add(qualname)
        return type(name, (Placeholder,), {"_qualname": qualname})


def restricted_unpickler(
    policy: PicklePolicy, base: type[Any] = pickle.Unpickler, placeholders: set[str] | None = None
) -> type[pickle.Unpickler]:
    """An unpickler class that resolves globals only as ``policy`` allows.

    Parameters
    ----------
    policy : the allow-list and what becomes of other globals.
    base : the unpickler class to restrict (e.g. pandas' ``pickle_compat.Unpickler``, which maps classes moved
        between pandas versions; its mapping runs after the policy's check).
    placeholders : a set that every instance adds the names of placeholder globals to (for readers such as
        ``torch.load`` that build the unpickler themselves); otherwise each instance has its own
        ``placeholders``.
    """
    attrs = {"policy": policy, "shared_placeholders": placeholders}
    return type(f"Restricted{base.__name__}", (_Restricted, base), attrs)
