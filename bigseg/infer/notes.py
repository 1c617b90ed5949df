"""Notes a predictor says once per job (torch-free: the exported and the torch predictor share it)."""
from __future__ import annotations


class Notes:
    """`note` says a message once (collected for the job that runs, see `take_notes`; `on_note`
    hears it at once). Users set `self.notes = []` and `self.on_note`."""

    notes: list[str]
    on_note: object

    def note(self, message: str) -> None:
        if message not in self.notes:
            self.notes.append(message)
            if self.on_note is not None:
                self.on_note(message)

    def take_notes(self) -> list[str]:
        taken, self.notes = self.notes, []
        return taken
