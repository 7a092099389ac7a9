"""A script's module state as it was right after load, and a fresh copy of it for every call.

Runs inside a worker process.  A call runs on its own *world*: the post-load globals, with
every value that can change copied (lists, dicts and sets, and the script's own functions,
rebuilt on the world with copies of their default arguments and closure cells; aliasing is
kept) and only what cannot change shared (numbers, strings, tuples and frozensets of them,
builtins, the helpers).  Nothing a call binds, rebinds or mutates reaches another call; what
an earlier call's finalizers write lands in that call's world, which nothing reads again.

Module state that cannot be copied that way (generators, iterators, bound methods of mutable
objects, anything else) is refused at load.  A script may opt in to keeping its state between
the calls of one client (``[sandbox] keep_state = "per_client"`` in ``NAME.toml``): a bounded
number of worlds per worker, one per client, never shared across clients.
"""

from __future__ import annotations

import collections
import inspect
import types
from typing import Any

from .errors import ScriptRefused
from .janssen_objects import SELF_KEY, SHAREABLE

KEEP_STATES = ("none", "per_client")
KEPT_CLIENTS = 64  # worlds kept per script and worker with keep_state = "per_client" (least recently used go)
MAX_STATE_DEPTH = 64

# Values of these types cannot change: every world shares them.
_IMMUTABLE = frozenset({type(None), bool, int, float, complex, str, bytes, range, slice, type(Ellipsis),
                        type(NotImplemented), *SHAREABLE})
# Code that can run again when its frame is finalized: a generator suspended inside try/with.
_SUSPENDABLE = (inspect.CO_GENERATOR | inspect.CO_COROUTINE | inspect.CO_ASYNC_GENERATOR
                | inspect.CO_ITERABLE_COROUTINE)
# Unbound methods and slots of builtin types: no state of their own.
_DESCRIPTORS = (types.MethodDescriptorType, types.WrapperDescriptorType, types.ClassMethodDescriptorType,
                types.GetSetDescriptorType, types.MemberDescriptorType)


# How a world copies one value of the template (decided at load).
_FLAT, _LIST, _DICT, _SET, _TUPLE, _FUNCTION, _PLAIN_FUNCTION = range(7)


class ModuleTemplate:
    """The globals a script's top level left, classified once; ``world()`` copies them."""

    def __init__(self, name: str, env: dict[str, Any]) -> None:
        self._name = name
        self._env = env  # kept alive: the ids below are the ids of its values
        self._recipes: dict[int, int] = {}  # id -> how to copy it, for every value a world copies
        self._shared_ids: set[int] = set()  # tuples and frozensets found to hold nothing to copy
        self._visiting: set[int] = set()
        # True if some of the script's code can run when an object of it is finalized: only a
        # generator suspended in a try or with block runs code when it is closed (scripts have no
        # classes, so no __del__).  Without such code, dropping a call's objects runs nothing.
        self.finalizers = False
        shared: dict[str, Any] = {}
        copied: list[tuple[str, Any]] = []
        for key, value in env.items():
            # The sandbox's own names (builtins, guards, the load's print collector): scripts
            # cannot name them, so no call can rebind or reach them.
            # (A Janssen script's instance attributes, SELF_KEY, are state like any global.)
            if (key.startswith("_") and key != SELF_KEY) or self._shares(key, value, 0):
                shared[key] = value
            else:
                copied.append((key, value))
        self._shared = shared
        self._copied = tuple(copied)
        self._visiting.clear()

    def world(self) -> dict[str, Any]:
        """Fresh globals for one call (or, with keep_state, for one client)."""
        world = self._shared.copy()
        if self._copied:
            memo: dict[int, Any] = {}
            copy = self._copy
            for key, value in self._copied:
                world[key] = copy(value, memo, world)
        return world

    # --- load time: what may be shared, what must be copied, what is refused ---
    def _shares(self, where: str, value: Any, depth: int) -> bool:
        kind = type(value)
        if kind in _IMMUTABLE:
            return True
        key = id(value)
        if key in self._recipes:
            return False
        if key in self._shared_ids:
            return True
        if depth > MAX_STATE_DEPTH:
            self._refuse(where, f"is nested deeper than {MAX_STATE_DEPTH} levels")
        if kind is list or kind is set or kind is dict:
            self._recipes[key] = _FLAT  # before its items: a cycle through it is copied as a cycle
            items = [x for pair in value.items() for x in pair] if kind is dict else list(value)
            flat = all([self._shares(where, item, depth + 1) for item in items])  # every item checked
            if not flat:
                self._recipes[key] = _LIST if kind is list else _DICT if kind is dict else _SET
            return False
        if kind is tuple or kind is frozenset:
            if key in self._visiting:
                self._refuse(where, "is a cycle through a tuple")
            self._visiting.add(key)
            shared = all([self._shares(where, item, depth + 1) for item in value])
            self._visiting.discard(key)
            if shared:
                self._shared_ids.add(key)
            else:
                self._recipes[key] = _TUPLE
            return shared
        if kind is types.FunctionType:
            if value.__globals__ is not self._env:
                return True  # a helper: a plain function of the sandbox's own
            # Rebuilt on each world, with copies of what it holds.
            holds = [*(value.__defaults__ or ()), *(value.__kwdefaults__ or {}).values()]
            for cell in value.__closure__ or ():
                try:
                    holds.append(cell.cell_contents)
                except ValueError:  # an empty cell
                    pass
            self._recipes[key] = _FUNCTION if holds or value.__closure__ else _PLAIN_FUNCTION
            self.finalizers = self.finalizers or _has_finalizer(value.__code__)
            for item in holds:
                self._shares(where, item, depth + 1)
            return False
        if kind is types.BuiltinFunctionType:  # len, "-".join, a_list.append
            owner = value.__self__
            if owner is None or isinstance(owner, types.ModuleType) or self._shares(where, owner, depth + 1):
                return True
            self._refuse(where, f"is a method of a {type(owner).__name__}")
        if isinstance(value, _DESCRIPTORS) or (kind is type and value.__module__ == "builtins"):
            return True
        self._refuse(where, f"holds a {kind.__name__}")
        return False  # not reached

    def _refuse(self, where: str, what: str) -> None:
        raise ScriptRefused(f"{self._name}: module-level {where!r} {what}, which cannot be reset between "
                            f"calls; build it inside the function that uses it")

    # --- call time ---
    def _copy(self, value: Any, memo: dict[int, Any], world: dict[str, Any]) -> Any:
        key = id(value)
        recipe = self._recipes.get(key)
        if recipe is None:
            return value  # shared
        if key in memo:
            return memo[key]
        if recipe == _PLAIN_FUNCTION:
            new = memo[key] = types.FunctionType(value.__code__, world, value.__name__)
            new.__qualname__ = value.__qualname__
            return new
        if recipe == _FLAT:
            memo[key] = copied = value.copy()
            return copied
        copy = self._copy
        if recipe == _LIST:
            memo[key] = new_list = []
            for item in value:
                new_list.append(copy(item, memo, world))
            return new_list
        if recipe == _DICT:
            memo[key] = new_dict = {}
            for k, v in value.items():
                new_dict[copy(k, memo, world)] = copy(v, memo, world)
            return new_dict
        if recipe == _SET:
            memo[key] = new_set = set()
            for item in value:
                new_set.add(copy(item, memo, world))
            return new_set
        if recipe == _TUPLE:  # no cycle runs through a tuple (refused at load)
            memo[key] = copied = type(value)([copy(item, memo, world) for item in value])
            return copied
        return self._copy_function(value, memo, world)

    def _copy_function(self, fn: types.FunctionType, memo: dict[int, Any], world: dict[str, Any]) -> Any:
        fill: list[tuple[types.CellType, types.CellType]] = []
        cells = None
        if fn.__closure__:
            fresh_cells = []
            for cell in fn.__closure__:
                fresh = memo.get(id(cell))
                if fresh is None:
                    fresh = memo[id(cell)] = types.CellType()
                    fill.append((cell, fresh))
                fresh_cells.append(fresh)
            cells = tuple(fresh_cells)
        new = types.FunctionType(fn.__code__, world, fn.__name__, None, cells)
        memo[id(fn)] = new  # before its contents: they may hold the function itself
        new.__qualname__ = fn.__qualname__
        copy = self._copy
        if fn.__defaults__:
            new.__defaults__ = tuple([copy(item, memo, world) for item in fn.__defaults__])
        if fn.__kwdefaults__:
            new.__kwdefaults__ = {k: copy(v, memo, world) for k, v in fn.__kwdefaults__.items()}
        for cell, fresh in fill:
            try:
                content = cell.cell_contents
            except ValueError:
                continue
            fresh.cell_contents = copy(content, memo, world)
        return new


def _has_finalizer(code: types.CodeType) -> bool:
    """Whether ``code`` or code nested in it is a generator with a handler (try, with): closing
    one suspended there runs its code.  A generator without one (every generator expression)
    only unwinds.  (Python 3.12+ gives every generator a handler: then all of them count.)"""
    stack = [code]
    while stack:
        item = stack.pop()
        if item.co_flags & _SUSPENDABLE and item.co_exceptiontable:
            return True
        stack.extend(c for c in item.co_consts if isinstance(c, types.CodeType))
    return False


class ScriptWorlds:
    """The worlds of one script in one worker: a fresh one per call, or with keep_state =
    "per_client" the last one of the calling client (at most KEPT_CLIENTS clients; the least
    recently used is dropped, within the step that needed the room)."""

    def __init__(self, template: ModuleTemplate, keep_state: str) -> None:
        self.template = template
        self._kept: collections.OrderedDict[str, dict[str, Any]] | None = (
            collections.OrderedDict() if keep_state == "per_client" else None)

    def take(self, client_id: str) -> dict[str, Any]:
        if self._kept is None:
            return self.template.world()
        world = self._kept.pop(client_id, None)
        if world is None:
            while len(self._kept) >= KEPT_CLIENTS:
                self._kept.popitem(last=False)
            world = self.template.world()
        return world

    @property
    def careful(self) -> bool:
        """Whether a call's end needs a full collection: its objects may outlive the youngest
        generation (kept state) or run code when finalized."""
        return self._kept is not None or self.template.finalizers

    def done(self, client_id: str, world: dict[str, Any]) -> None:
        """The call that took ``world`` is over: kept for the client (else it is garbage: it
        and its functions refer to each other, so the collector frees it)."""
        if self._kept is not None:
            self._kept[client_id] = world
