"""``async-component``: one console script, one subcommand per process."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import re
import sys
from collections.abc import Mapping, Sequence

from . import __version__
from .settings import ConsumerSettings, ControllerSettings, ProducerSettings, SettingsError, SourceSettings, flag_name, load

# subcommand -> (module with run(settings), settings class or None when the module
# declares its own flags with add_arguments(parser) and run(args), help)
COMMANDS: dict[str, tuple[str, type | None, str]] = {
    "producer": ("async_component.dataplane.producer", ProducerSettings, "accept requests, queue them in Redis, answer 202"),
    "source": ("async_component.dataplane.source", SourceSettings,
               "replay queued requests, record the outcome (or post them to SINK_URL as CloudEvents)"),
    "consumer": ("async_component.dataplane.sink", ConsumerSettings,
                 "replay queued requests received as CloudEvents (a RedisStreamSource's sink), record the outcome"),
    "controller": ("async_component.controller.operator", ControllerSettings, "kopf operator for async Knative Ingresses"),
    "local": ("async_component.local.stack", None, "run the whole stack on 127.0.0.1 (Redis, gateway, sleep app)"),
    "gateway": ("async_component.local.gateway", None, "the local stack's stand-in for Kourier or Istio"),
}


STATES_DEFAULT = re.compile(r"\bdefault:")


class HelpFormatter(argparse.HelpFormatter):
    """States an option's default once: the one its help names, else argparse's, none for an option without one."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if (STATES_DEFAULT.search(text) or action.required or not action.option_strings or action.nargs == 0
                or action.default in (None, argparse.SUPPRESS)):
            return text
        return text + " (default: %(default)s)"


def setting_help(meta: Mapping[str, str]) -> str:
    """A settings field's help: what it does, its environment variable and its default, each once."""
    alias = f" or {meta['alias']}" if meta["alias"] else ""
    return f"{meta['help']} (env {meta['env']}{alias}; default: {meta['raw_default'] or 'unset'})"


def build_parser(chosen: str | None = None) -> argparse.ArgumentParser:
    """``chosen``: the only command whose own module is imported to declare flags."""
    parser = argparse.ArgumentParser(prog="async-component", description="Call any Knative Service asynchronously.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, settings_cls, help_text) in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text,
                             formatter_class=HelpFormatter)
        if settings_cls is None:
            if name == chosen:
                importlib.import_module(module).add_arguments(cmd)
            continue
        for field in dataclasses.fields(settings_cls):
            env = field.metadata["env"]
            cmd.add_argument(flag_name(env), dest=env, metavar=env, default=None, help=setting_help(field.metadata))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    chosen = next((arg for arg in argv if not arg.startswith("-")), None)
    args = build_parser(chosen).parse_args(argv)
    module_name, settings_cls, _ = COMMANDS[args.command]
    if settings_cls is None:
        return int(importlib.import_module(module_name).run(args) or 0)
    try:
        settings = load(settings_cls, overrides=vars(args))
        module = importlib.import_module(module_name)
        settings = module.validate(settings) if hasattr(module, "validate") else settings
    except SettingsError as exc:
        print(f"async-component {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return int(module.run(settings) or 0)


if __name__ == "__main__":
    sys.exit(main())
