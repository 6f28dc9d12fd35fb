"""The macOS menu-bar app: a platform-neutral controller and the thin rumps shell that draws it."""

from __future__ import annotations

from ...errors import Qwen35Error


def run_menubar_app(model: str | None = None, port: int = 8080) -> None:
    """Run the menu-bar app (macOS with the ``app`` extra); elsewhere a one-line error."""
    try:
        import rumps  # noqa: F401
    except ImportError:
        raise Qwen35Error("the menu-bar app needs macOS and its extra: pip install 'mlx-qwen35[app]'") from None
    from .controller import AppController
    from .shell import MenuBarApp

    MenuBarApp(AppController(port=port), model_hint=model).run()
