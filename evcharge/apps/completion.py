"""TAB completion for the vehicle's prompt: commands, their options, and the ids and cities they take.

The options come from the same argparse definitions the commands are parsed with,
so completion never offers what the parser would refuse. The word being completed
is the text since the last space (ids like ``NAT-PN-1`` have dashes: a completer
that splits words at punctuation offered ids only on an empty word), matched
without case; a city with a space is inserted quoted. Reservation and trip ids are
the vehicle's own, as the prompt last saw them.
"""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Callable, Iterable, Iterator

from prompt_toolkit.completion import CompleteEvent, Completer, Completion
from prompt_toolkit.document import Document

# What an argument's value is, by its argparse dest: the name of a source of words.
VALUE_KINDS = {
    "station": "stations",
    "charge_point": "charge_points",
    "reservation": "reservations",
    "trip": "trips",
    "origin": "cities",
    "destination": "cities",
    "near": "cities",
    "city": "cities",
}


class VehicleCompleter(Completer):
    def __init__(
        self,
        commands: dict[str, argparse.ArgumentParser | None],
        words: dict[str, Callable[[], Iterable[str]]],
    ) -> None:
        """``commands``: each command's parser (None: it takes nothing); ``words``: each kind's words, now."""
        self.commands = commands
        self.words = words

    def get_completions(self, document: Document, complete_event: CompleteEvent) -> Iterator[Completion]:
        before = document.text_before_cursor
        if before.count('"') % 2:  # inside a quote: a city with a space, being typed
            head, _, partial = before.rpartition('"')
            current = '"' + partial
        else:
            head, _, current = before.rpartition(" ")
        try:
            typed = shlex.split(head)
        except ValueError:
            return
        if not typed:
            yield from _matching(current, sorted(self.commands))
            return
        parser = self.commands.get(typed[0])
        if parser is None:
            return
        options = {s: a for a in parser._actions for s in a.option_strings if s.startswith("--")}
        last = typed[-1]
        if last in options and options[last].nargs != 0:
            yield from _matching(current, self._values(options[last].dest))  # the value of an option
            return
        if current.startswith("-"):
            given = set(typed)
            yield from _matching(current, sorted(o for o in options if o not in given and o != "--help"))
            return
        positionals = [a for a in parser._actions if not a.option_strings]
        taken = _positionals_given(typed[1:], options)
        if taken < len(positionals):
            yield from _matching(current, self._values(positionals[taken].dest))

    def _values(self, dest: str) -> list[str]:
        kind = VALUE_KINDS.get(dest)
        return sorted(self.words[kind]()) if kind in self.words else []


def _positionals_given(words: list[str], options: dict[str, argparse.Action]) -> int:
    count, skip = 0, False
    for word in words:
        if skip:
            skip = False
        elif word in options:
            skip = options[word].nargs != 0
        elif not word.startswith("-"):
            count += 1
    return count


def _matching(current: str, candidates: Iterable[str]) -> Iterator[Completion]:
    folded = current.strip('"').casefold()
    for word in candidates:
        if word.casefold().startswith(folded):
            text = f'"{word}"' if " " in word else word
            yield Completion(text, start_position=-len(current))
