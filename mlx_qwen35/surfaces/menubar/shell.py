"""The macOS menu-bar shell (rumps): draws menus, calls the controller for everything."""

from __future__ import annotations

import rumps

from ...weights.local_models import DEFAULT_SEARCH_DIRS, find_models
from .controller import AppController


class MenuBarApp(rumps.App):
    """Open Chat, the model picker, Start/Stop, a status line refreshed every few seconds, Quit."""

    def __init__(self, controller: AppController, model_hint: str | None = None):
        super().__init__("Qwen", quit_button="Quit")
        self.controller = controller
        self.models = find_models(DEFAULT_SEARCH_DIRS)
        chosen = next((m for m in self.models if model_hint in (m.name, str(m.path))), None) if model_hint else None
        self.controller.model = chosen or next((m for m in self.models if m.fits), None)
        self.status_item = rumps.MenuItem("")
        picker = rumps.MenuItem("Model")
        for entry in self.models:
            picker.add(rumps.MenuItem(entry.label, callback=self._pick(entry)))
        self.toggle_item = rumps.MenuItem("Start Server", callback=self.toggle)
        self.menu = [
            rumps.MenuItem("Open Chat", callback=self.open_chat, key="o"),
            picker,
            self.toggle_item,
            self.status_item,
        ]
        self.refresh(None)

    def _pick(self, entry):
        def pick(_):
            self.controller.choose(entry)
            self.refresh(None)

        return pick

    def open_chat(self, _):
        if not self.controller.running:
            self.controller.start()
        self.controller.open_chat()

    def toggle(self, _):
        self.controller.stop() if self.controller.running else self.controller.start()
        self.refresh(None)

    @rumps.timer(3)
    def refresh(self, _):
        self.toggle_item.title = "Stop Server" if self.controller.running else "Start Server"
        self.status_item.title = self.controller.status()
