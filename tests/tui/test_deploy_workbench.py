"""Deploying from the workbench: the palette starts and stops `tunebench deploy` for the Chat pane's
columns, the status bar shows the address, the served names and the live request count, and the
equivalent command can be copied. A stand-in server (fake_deploy.py) answers for the real one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tui_helpers import no_start, wait_until
from tunebench.tui.app import TuneBenchApp
from tunebench.tui.widgets.chat.column_choices import BASE, ColumnChoice

FAKE_DEPLOY = str(Path(__file__).parent / "fake_deploy.py")


def stand_in(argv: list[str], **options) -> subprocess.Popen:
    """Popen for the app: the real command's arguments, given to the stand-in server instead."""
    deploy_args = argv[argv.index("deploy") + 1 :]
    return subprocess.Popen([sys.executable, FAKE_DEPLOY, *deploy_args], **options)


async def palette(pilot, command: str) -> None:
    await pilot.press("ctrl+p")
    await pilot.press(*command)
    await pilot.pause(0.3)
    await pilot.press("enter")


async def test_palette_starts_shows_copies_and_stops_a_deployment(workspace, fake_engine):
    adapter = workspace / "runs" / "0612-1530" / "adapter"
    adapter.mkdir(parents=True)
    app = TuneBenchApp(workspace, starter=no_start)
    app.deploy_popen = stand_in
    async with app.run_test(size=(160, 32)) as pilot:
        await wait_until(pilot, lambda: app.client.connected and app.snapshot, what="the engine")
        app.chat_pane.set_targets([ColumnChoice(BASE, BASE), ColumnChoice(str(adapter), "0612-1530 final")])
        await palette(pilot, "deploy start")
        await wait_until(pilot, lambda: app.deployment is not None, what="the deployment to start")
        plan = app.deployment.plan
        assert plan.command == f"tunebench deploy --adapters 0612-1530={adapter} --port {plan.port}"
        status = app.status_bar
        await wait_until(pilot, lambda: "running" in status.deploy, timeout=10, what="the server to answer")
        assert (
            status.deploy
            == f"deploy http://127.0.0.1:{plan.port}/v1 base, 0612-1530 · 2 requests running, 1 waiting"
        )
        assert "0612-1530 · 2 requests running" in str(status.render())
        await palette(pilot, "deploy copy")
        await wait_until(pilot, lambda: app.clipboard == plan.command, what="the command copied")
        process = app.deployment.process
        await palette(pilot, "deploy stop")
        await wait_until(pilot, lambda: process.poll() is not None, timeout=10, what="the server to stop")
        assert app.deployment is None and status.deploy == ""


async def test_a_deployment_that_fails_says_why(workspace, fake_engine):
    def failing(argv: list[str], **options) -> subprocess.Popen:
        script = "print('error: model not found: nowhere'); raise SystemExit(2)"
        return subprocess.Popen([sys.executable, "-c", script], **options)

    app = TuneBenchApp(workspace, starter=no_start)
    app.deploy_popen = failing
    async with app.run_test(size=(160, 32)) as pilot:
        await wait_until(pilot, lambda: app.client.connected and app.snapshot, what="the engine")
        app.action_deploy_start()
        assert app.deployment is not None and "--model no-such-model" in app.deployment.plan.command
        await wait_until(pilot, lambda: app.deployment is None, timeout=10, what="the failure")
        assert app.status_bar.deploy == ""

        def said() -> bool:
            return any("error: model not found: nowhere" in n.message for n in app._notifications)

        # the notice is posted to the app; under load it can land a refresh after the stop
        await wait_until(pilot, said, timeout=10, what="the child's error in a notice")
