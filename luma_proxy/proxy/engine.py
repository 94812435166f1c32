"""Cheaper hook dispatch for the lean master of ``luma-proxy run``.

mitmproxy's ``AddonManager`` finds the handlers of every event anew: for each
addon it walks the addon tree, looks the hook up by name, rebuilds the event's
arguments and enters a context manager, and after every flow event it does it
all again for the ``update`` hook. With twelve addons that is the largest cost
luma-proxy adds per request (docs/performance.md, "Where the time goes").

``HookTable`` resolves each hook name once to the handlers that exist and keeps
that list until the addon chain changes. Semantics are mitmproxy's: handlers run
in chain order, an ``AddonHalt`` stops the event, ``OptionsError`` propagates,
and any other exception is logged and skips the rest of that addon's subtree.
mitmdump and mitmweb keep mitmproxy's own manager: their script loader can
change the tree at any time.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import types
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from mitmproxy import addonmanager, exceptions, flow, hooks, master

from luma_proxy.proxy import engine_patches

# (index of the top-level addon in the chain, handler)
Handlers = tuple[tuple[int, Callable[..., Any]], ...]


@functools.cache
def _field_names(hook_type: type[hooks.Hook]) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(hook_type))  # type: ignore[arg-type]


def hook_args(event: hooks.Hook) -> list[Any]:
    """``event.args()``, without looking the dataclass fields up on every event."""
    names = _field_names(type(event))
    if len(names) == 1:  # every flow hook
        return [getattr(event, names[0])]
    return [getattr(event, name) for name in names]


def handlers_for(chain: list[Any], name: str) -> Handlers:
    """Every callable ``name`` in ``chain`` and its children, in dispatch order."""
    found: list[tuple[int, Callable[..., Any]]] = []
    for index, top in enumerate(chain):
        for addon in addonmanager.traverse([top]):
            func = getattr(addon, name, None)
            if func is None or isinstance(func, types.ModuleType):
                continue  # mitmproxy skips modules named like hooks ("from mitmproxy import log")
            if not callable(func):
                raise exceptions.AddonManagerError(
                    f"Addon handler {name} ({addon}) not callable")
            found.append((index, func))
    return tuple(found)


class HookTable(addonmanager.AddonManager):
    """An ``AddonManager`` that looks up each hook's handlers once per chain."""

    def __init__(self, master: master.Master) -> None:
        super().__init__(master)
        self._table: dict[str, Handlers] = {}

    def handlers(self, name: str) -> Handlers:
        found = self._table.get(name)
        if found is None:
            found = self._table[name] = handlers_for(self.chain, name)
        return found

    def add(self, *addons: Any) -> None:
        try:
            super().add(*addons)
        finally:
            self._table.clear()

    def remove(self, addon: Any) -> None:
        try:
            super().remove(addon)
        finally:
            self._table.clear()

    def clear(self) -> None:
        try:
            super().clear()
        finally:
            self._table.clear()

    def trigger(self, event: hooks.Hook) -> None:
        """Synchronous events (``configure``, ``load``...), dispatched by mitmproxy itself.

        After ``configure`` the table is looked up anew: an addon may switch a
        hook on or off with its options (a hook attribute set to ``None`` is skipped).
        """
        try:
            super().trigger(event)
        finally:
            if event.name == "configure":
                self._table.clear()

    async def trigger_event(self, event: hooks.Hook) -> None:
        found = self.handlers(event.name)
        if found and (pending := self._call(found, hook_args(event))) is not None:
            await pending

    async def handle_lifecycle(self, event: hooks.Hook) -> None:
        found = self.handlers(event.name)
        if found and (pending := self._call(found, hook_args(event))) is not None:
            await pending
        if self.handlers("update"):
            message = hook_args(event)[0]
            if isinstance(message, flow.Flow):
                await self.trigger_event(hooks.UpdateHook([message]))

    def _call(self, found: Handlers, args: list[Any]) -> Coroutine[Any, Any, None] | None:
        """Run the handlers, synchronously until one returns an awaitable.

        Nearly every handler is synchronous, so nearly every event is dispatched
        without creating a coroutine; the rest of a chain that awaits continues
        in the coroutine returned (``_resume``). This loop is the common case (a
        flow hook: one argument, no handler failing), about half the bytecodes
        per handler of the general one (``_call_from``), which takes over when a
        handler raises.
        """
        if len(args) != 1:
            return self._call_from(found, args, 0, -1)
        arg = args[0]
        entry = found[0]
        try:
            for entry in found:
                result = entry[1](arg)
                if result is not None and inspect.isawaitable(result):
                    return self._resume(found, args, found.index(entry), -1, result)
        except exceptions.AddonHalt:
            return None
        except exceptions.OptionsError:
            raise
        except Exception as e:
            logging.error(f"Addon error: {e}", exc_info=True)
            return self._call_from(found, args, found.index(entry) + 1, entry[0])
        return None

    def _call_from(self, found: Handlers, args: list[Any], start: int,
                   failed: int) -> Coroutine[Any, Any, None] | None:
        """``_call``'s loop from handler ``start`` on, skipping the addon ``failed`` (one
        whose handler raised: the rest of its tree is skipped, as mitmproxy does)."""
        for position in range(start, len(found)):
            index, func = found[position]
            if index == failed:
                continue
            try:
                result = func(*args)
            except exceptions.AddonHalt:
                return None
            except exceptions.OptionsError:
                raise
            except Exception as e:
                failed = index
                logging.error(f"Addon error: {e}", exc_info=True)
                continue
            if result is not None and inspect.isawaitable(result):
                return self._resume(found, args, position, failed, result)
        return None

    async def _resume(self, found: Handlers, args: list[Any], position: int, failed: int,
                      awaitable: Awaitable[Any]) -> None:
        try:
            await awaitable
        except exceptions.AddonHalt:
            return
        except exceptions.OptionsError:
            raise
        except Exception as e:
            failed = found[position][0]
            logging.error(f"Addon error: {e}", exc_info=True)
        if (pending := self._call_from(found, args, position + 1, failed)) is not None:
            await pending


def install(lean: master.Master) -> HookTable:
    """Give a master without addons a ``HookTable``; returns it."""
    old = lean.addons
    if len(old):
        raise RuntimeError("install the hook table before adding addons")
    engine_patches.detach_addon_manager(lean)
    table = lean.addons = HookTable(lean)
    return table
