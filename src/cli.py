"""What every command-line program of Kiln shares: `--help` that shows each option's default."""

from __future__ import annotations

import argparse
import copy


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """`--help` with every option's default (also of options without a help text), and the description's own line
    breaks kept."""

    def _format_action(self, action: argparse.Action) -> str:
        unset = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if action.help is None and action.option_strings and not unset:
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or "(default" in action.help:  # unset, an off flag,
            return action.help  # or the help says it in its own words
        return super()._get_help_string(action)
