"""The TuneBench workbench: five panes over one engine connection.

`run(workspace, model)` is what `tunebench [WORKSPACE]` calls. Importing this module never
imports torch, transformers, peft or bitsandbytes (tests/tui/test_imports.py checks it): the
engine is a separate process, reached through EngineClient over the workspace's Unix socket.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from textual import on, work
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.screen import ModalScreen, Screen
from textual.widgets import Footer, TabbedContent, TabPane
from textual.worker import Worker, WorkerState
from tunebench.engine.core import protocol as P
from tunebench.engine.core.config import to_dict
from tunebench.engine.core.errors import UserError
from tunebench.engine.core.plans import default_budget_gib
from tunebench.engine.core.probes import default_probes, read_probes
from tunebench.engine.core.workspace import ENGINE_IDLE_EXIT_S
from tunebench.engine.process.client import probe_socket

from .debounce import Debouncer
from .deployment import DeployProcess, DeployState, free_port, plan_deploy
from .engine_client import EngineClient, Starter, error_text
from .screens.confirm import Choice
from .screens.engine_lost import EngineLost
from .screens.error import ErrorScreen
from .screens.help import HelpScreen, HelpSection
from .screens.targets_picker import TargetsPicker
from .widgets.chat.chat_pane import ChatPane
from .widgets.chat.column_choices import BASE, ColumnChoice, column_label, default_columns, discover_columns
from .widgets.dataset.dataset_pane import DatasetPane
from .widgets.gpu.gpu_pane import GpuPane
from .widgets.params.params_pane import ParamsPane
from .widgets.status.status_bar import StatusBar
from .widgets.train.checkpoint_list import CheckpointList
from .widgets.train.train_pane import TrainPane
from .workspace_setup import prepare_workspace

PANES = (
    ("dataset", "Dataset", DatasetPane),
    ("params", "Parameters", ParamsPane),
    ("gpu", "GPU", GpuPane),
    ("train", "Train", TrainPane),
    ("chat", "Chat", ChatPane),
)
ESTIMATE_DELAY_S = 0.8  # ask for a memory estimate once the form stops changing
ENGINE_WATCH_S = 2.0  # how often a TUI whose engine is lost looks for a new one to attach to
TRAIN_EVENTS = (
    P.ModelLoaded,
    P.DataReport,
    P.TrainStarted,
    P.TrainStep,
    P.EvalResult,
    P.CheckpointSaved,
    P.TrainFinished,
    P.ProbeVerdict,
)
# Keys that Textual's own widgets and the focus chain handle, for the help screen.
GLOBAL_HELP_KEYS = (
    ("tab / shift+tab", "move between the parts of a pane"),
    ("esc", "leave a text field: digits switch panes again (f2-f6 work from anywhere)"),
)
# Errors that end a training run: shown in a modal, since the person must act on them.
RUN_FAILURES = {"oom", "data", "config", "model", "user", "internal"}


def _while_running(handler: Callable[[TuneBenchApp, Any], None]) -> Callable[[TuneBenchApp, Any], None]:
    """Engine messages still queued when the app shuts down arrive after the panes are gone."""

    @functools.wraps(handler)
    def guarded(app: TuneBenchApp, message: Any) -> None:
        if app.is_running:
            handler(app, message)

    return guarded


class TuneBenchApp(App[int]):
    CSS_PATH = "app.tcss"
    TITLE = "TuneBench"
    BINDINGS = [
        Binding("question_mark", "help", "Help"),
        Binding("f1", "help", "Help", show=False),
        *[
            Binding(str(n), f"show_pane('{pane}')", f"Go to {title}", show=False)
            for n, (pane, title, _) in enumerate(PANES, 1)
        ],
        # F2-F6 switch panes even while a text field has the focus (digits type into it).
        *[
            Binding(f"f{n + 1}", f"show_pane('{pane}')", f"Go to {title}", show=False, priority=True)
            for n, (pane, title, _) in enumerate(PANES, 1)
        ],
        Binding("ctrl+q", "quit", "Quit", priority=True),
    ]

    def __init__(self, workspace: Path, model: str | None = None, *, starter: Starter | None = None) -> None:
        super().__init__()
        self.workspace_info, self.settings, self.dataset_path = prepare_workspace(workspace, model)
        self.workspace = self.workspace_info.root
        self.client = EngineClient(self, self.workspace, **({"starter": starter} if starter else {}))
        self.requests: dict[str, str] = {}  # request id -> what it was for, to route errors
        self.train_ids: set[str] = set()  # ids of training jobs: their Log events go to Train
        self.snapshot: P.Snapshot | None = None  # None until the first connect
        self.farewell = ""  # printed to the terminal once the app has closed
        self._estimate = Debouncer(self, ESTIMATE_DELAY_S, self.request_memory_estimate)
        self._budget_known = False  # max_memory's default follows the first GPU sample
        self.deployment: DeployProcess | None = None  # `tunebench deploy` started from the palette
        self.deploy_popen: Callable[..., Any] | None = None  # tests start a stand-in server
        self._deploy_timer: Any = None
        self._engine_watch: Any = None  # while the engine is lost (_reattach_if_engine_back)

    # ------------------------------------------------------------ layout

    def compose(self) -> ComposeResult:
        yield StatusBar(id="status")
        with TabbedContent(initial="dataset", id="panes"):
            with TabPane("1 Dataset", id="dataset"):
                yield DatasetPane(self.settings, self.workspace, self.dataset_path, id="dataset-pane")
            with TabPane("2 Parameters", id="params"):
                yield ParamsPane(self.settings, id="params-pane")
            with TabPane("3 GPU", id="gpu"):
                yield GpuPane(id="gpu-pane")
            with TabPane("4 Train", id="train"):
                yield TrainPane(self.workspace, id="train-pane")
            with TabPane("5 Chat", id="chat"):
                yield ChatPane(id="chat-pane")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        if self.settings.load_problem:
            self.notify(self.settings.load_problem, severity="warning", timeout=10)
        self._main.query_one(ChatPane).set_targets(default_columns(self.workspace_info.runs_dir))
        self._main.query_one("#sample-table").focus()
        self.connect_engine()

    @property
    def _main(self) -> Screen:
        # Engine events arrive while a dialog is open: look the panes up on the main screen, not
        # on whatever screen is on top.
        return self.screen_stack[0]

    @property
    def dataset_pane(self) -> DatasetPane:
        return self._main.query_one(DatasetPane)

    @property
    def train_pane(self) -> TrainPane:
        return self._main.query_one(TrainPane)

    @property
    def chat_pane(self) -> ChatPane:
        return self._main.query_one(ChatPane)

    @property
    def gpu_pane(self) -> GpuPane:
        return self._main.query_one(GpuPane)

    @property
    def status_bar(self) -> StatusBar:
        return self._main.query_one(StatusBar)

    # ------------------------------------------------------------ engine

    @work(exclusive=True, group="engine", exit_on_error=False)
    async def connect_engine(self) -> None:
        self.status_bar.set_engine("starting", "(connecting…)")
        await self.client.close()
        await self.client.connect()

    @on(Worker.StateChanged)
    def _worker_failed(self, event: Worker.StateChanged) -> None:
        # Every background failure lands here, once, as something a person can read.
        if event.state != WorkerState.ERROR:
            return
        error = event.worker.error
        if event.worker.group == "engine":
            self._engine_lost(f"could not reach the engine: {error}")
        else:
            self.push_screen(ErrorScreen("Something failed", f"{type(error).__name__}: {error}"))

    def send_request(self, request: P.Request, purpose: str = "") -> str:
        """Send to the engine; returns the request id, or "" when there is no engine to send to."""
        if not self.client.connected:
            self.notify("the engine is not connected", severity="error")
            return ""
        request_id = self.client.send(request)
        self.requests[request_id] = purpose or request.type
        return request_id

    @on(EngineClient.Connected)
    @_while_running
    def _connected(self, message: EngineClient.Connected) -> None:
        snapshot = message.snapshot
        first_attach = self.snapshot is None
        self.snapshot = snapshot
        self.requests.pop(snapshot.id, None)  # the answer to our Hello
        if snapshot.job == "train":
            self.train_ids.add(snapshot.job_id)
        self.status_bar.set_engine("connected", f"pid {snapshot.engine_pid}")
        self.status_bar.set_snapshot(snapshot)
        if self._engine_watch is not None:  # it was lost, and is back
            self._engine_watch.stop()
            self._engine_watch = None
        # Every Snapshot replaces the picture of the run: a reattach redraws the whole history.
        self.train_pane.reset()
        self.train_pane.apply_events(message.history, replay=True)
        if snapshot.run_status == "interrupted" and snapshot.job != "train":
            self.train_pane.set_status("interrupted")
        if snapshot.job == "train" and not self.train_pane.run.live:
            self.train_pane.set_status("loading", "the run is starting")
        if snapshot.job == "train" and first_attach:
            self._show_once_tabs_settle("train")  # reattaching to a live run: show it, not the dataset
        if snapshot.last_error and snapshot.job != "train":
            error = snapshot.last_error  # what went wrong while no TUI was watching
            self.train_pane.log_line(f"last error [{error.get('code')}] {error.get('message')}", "red")
        self.schedule_estimate()

    @on(EngineClient.EventReceived)
    @_while_running
    def _event(self, message: EngineClient.EventReceived) -> None:
        event = message.event
        if isinstance(event, P.Log) and self.requests.get(event.id) == "stop":
            # The engine took our stop: only now is the run stopping (a refusal, say from a
            # session that just lost control, comes as an EngineError and changes nothing).
            del self.requests[event.id]
            if self.train_pane.run.live:
                self.train_pane.set_status("stopping")
        if isinstance(event, TRAIN_EVENTS) or (isinstance(event, P.Log) and self._is_train_event(event)):
            self.train_pane.apply_events([event])
            if isinstance(event, P.TrainFinished):
                self._train_finished(event)
        elif isinstance(event, (P.TokenChunk, P.GenerateDone)):
            self.chat_pane.handle_event(event)
        elif isinstance(event, P.MemoryEstimate):
            self.gpu_pane.show_estimate(event)
            self._main.query_one(ParamsPane).show_sharding(event.sharding)
        elif isinstance(event, P.EngineError):
            self._engine_error(event)
        elif isinstance(event, P.JobStatus):
            self._job_status(event)
        elif isinstance(event, P.ControlChanged):
            self.status_bar.set_read_only(
                "" if event.controller else event.controller_client or "another session"
            )
            if event.message:
                self.notify(event.message, severity="information" if event.controller else "warning")
        elif isinstance(event, P.Log):
            self.log.info(event.message)
        if isinstance(event, (P.GenerateDone, P.MemoryEstimate, P.TrainFinished)):
            self.requests.pop(event.id, None)  # answered: nothing more will come for it

    def _is_train_event(self, event: P.Log) -> bool:
        return event.id in self.train_ids or self.train_pane.run.live

    def _job_status(self, event: P.JobStatus) -> None:
        # Every client gets these, read-only ones too: the Train pane follows the engine, not
        # what this TUI asked for (a refused start never shows as "loading").
        self.status_bar.set_job(event.job if event.state == "started" else "")
        if event.job != "train":
            return
        if event.state == "started":
            self.train_ids.add(event.id)
            self.train_pane.set_status("loading", "the run is starting")
        elif event.state == "failed" and self.train_pane.run.status in ("loading", "stopping", "training"):
            self.train_pane.set_status("failed")

    @on(EngineClient.MemorySampled)
    @_while_running
    def _memory(self, message: EngineClient.MemorySampled) -> None:
        self.gpu_pane.show_sample(message.sample)
        self.status_bar.set_memory(message.sample)
        gpus = message.sample.gpus
        self._main.query_one(ParamsPane).set_visible_gpus(
            [int(g.get("index", i)) for i, g in enumerate(gpus)]
        )
        if gpus and not self._budget_known:
            # max_memory's default is what the card has free when the workbench first sees it
            self._budget_known = True
            free = int(gpus[0].get("total", 0)) - int(gpus[0].get("used", 0))
            if self.settings.set_default("max_memory", f"{default_budget_gib(free):.1f}"):
                self._main.query_one(ParamsPane).refresh_fields(["max_memory"])
                self.schedule_estimate()

    @on(EngineClient.ProgressTicked)
    @_while_running
    def _progress(self, message: EngineClient.ProgressTicked) -> None:
        progress = message.progress
        if self.requests.get(progress.id) == "chat":
            self.chat_pane.show_progress(progress)
        else:
            self.train_pane.apply_events([progress])

    @on(EngineClient.Disconnected)
    @_while_running
    def _disconnected(self, message: EngineClient.Disconnected) -> None:
        self._engine_lost(message.reason)

    def _engine_lost(self, reason: str) -> None:
        self.status_bar.set_engine("lost", reason)
        self.status_bar.set_job("")
        self.status_bar.set_read_only("")  # who controlled the lost engine controls nothing now
        self.chat_pane.engine_lost()
        if self.train_pane.run.live:
            self.train_pane.set_status("interrupted")
        if self._engine_watch is None:
            self._engine_watch = self.set_interval(ENGINE_WATCH_S, self._reattach_if_engine_back)
        if isinstance(self.screen, EngineLost):
            return

        def answer(choice: str | None) -> None:
            if choice == "restart":
                self.connect_engine()
            elif choice == "quit":
                self.call_later(self.action_quit)

        self.push_screen(EngineLost(reason, str(self.workspace_info.log_file)), answer)

    def _reattach_if_engine_back(self) -> None:
        """While the engine is lost: another session (a second TUI, `tunebench workspace` in
        another terminal) may start a new one; attach to it as soon as it listens."""
        connecting = any(w.group == "engine" and not w.is_finished for w in self.workers)
        if self.client.connected or connecting:
            return  # _connected stops this watch
        if probe_socket(self.workspace) != "live":
            return
        if isinstance(self.screen, EngineLost):
            self.screen.dismiss("")
        self.notify("an engine is running in this workspace again: reattached")
        self.connect_engine()

    def _engine_error(self, error: P.EngineError) -> None:
        purpose = self.requests.pop(error.id, "")
        if error.code == "read_only":
            self.status_bar.set_read_only("another session")
            self.notify(error_text(error), severity="warning", timeout=8)
            self.chat_pane.handle_event(error)
            return
        if purpose == "estimate":
            self.gpu_pane.show_estimate(None, error_text(error))
            return
        if purpose in ("chat", "cancel"):
            self.chat_pane.handle_event(error)
            return
        if error.code in ("busy", "idle"):
            self.notify(error_text(error), severity="warning", timeout=6)
            return
        self.train_pane.log_line(f"error [{error.code}] {error.message}", "bold red")
        if error.hint:
            self.train_pane.log_line(f"  what to do: {error.hint}", "red")
        if purpose == "train" or (self.train_pane.run.live and error.code in RUN_FAILURES):
            self.train_pane.set_status("failed")
            title = "Out of memory" if error.code == "oom" else "Training stopped"  # the message says which
            self.push_screen(ErrorScreen(title, error.message, error.hint))
        else:
            self.notify(error_text(error), severity="error", timeout=8)

    def _train_finished(self, event: P.TrainFinished) -> None:
        if event.adapter_dir and not self.chat_pane.chosen_by_person:
            self.chat_pane.set_targets(default_columns(self.workspace_info.runs_dir))
        severity = "information" if event.status == "completed" else "warning"
        self.notify(f"training {event.status} after {event.steps} steps", severity=severity)

    # ------------------------------------------------------------ actions the panes call

    def start_training(self, resume: bool = False) -> None:
        settings = self.settings
        if not settings.valid:
            names = ", ".join(sorted(settings.errors))
            self.notify(f"fix the parameters first: {names}", severity="error")
            self.action_show_pane("params")
            return
        if self.dataset_pane.store.dirty and not self.dataset_pane.save(quiet=False):
            self.notify("the dataset could not be saved, so training did not start", severity="error")
            return
        config = to_dict(settings.config)
        if resume:
            run = self.workspace_info.last_run()
            if run is None or not run.checkpoints:
                self.notify("no run with a checkpoint to resume", severity="warning")
                return
            config["resume_from_checkpoint"] = str(run.path)
        if self.send_request(P.StartTraining(config=config), "train"):
            self.action_show_pane("train")  # JobStatus "started" sets the pane going

    def stop_training(self, mode: str) -> None:
        holder = self.status_bar.read_only
        if holder:
            # The engine would refuse it: say so here rather than show a stop that never comes.
            self.notify(
                f"read-only: {holder} controls this workspace, so its run cannot be stopped from here. "
                "To stop it: ctrl+p, Engine: take control, then try again",
                severity="warning",
                timeout=8,
            )
            return
        if mode == "abort":

            def confirmed(key: str) -> None:
                if key == "y":
                    self._send_stop("abort")

            self.push_screen(
                Choice(
                    "Abort training?",
                    "Abort stops now and saves nothing since the last checkpoint.",
                    {"y": "abort now"},
                ),
                confirmed,
            )
            return
        self._send_stop(mode)

    def _send_stop(self, mode: str) -> None:
        if not self.train_pane.run.live:
            self.notify("no training run is going", severity="warning")
            return
        self.send_request(P.StopTraining(mode=mode), "stop")  # "stopping" once the engine says so

    def schedule_estimate(self) -> None:
        self._estimate.poke()

    def request_memory_estimate(self) -> None:
        if not self.client.connected:
            return
        if not self.settings.valid:
            self.gpu_pane.show_estimate(None, "fix the parameters first; the estimate follows the form")
            return
        self.send_request(P.EstimateMemory(config=to_dict(self.settings.config)), "estimate")

    def choose_chat_targets(self) -> None:
        available = discover_columns(self.workspace_info.runs_dir)

        def chosen(targets: list | None) -> None:
            if targets:
                self.chat_pane.set_targets(targets, by_person=True)

        self.push_screen(TargetsPicker(available, self.chat_pane.targets), chosen)

    def probe_questions(self) -> list[str]:
        """The probe set `tunebench probe` reads for this workspace; [] when there is none or it
        cannot be read, which a notice says."""
        try:
            path = default_probes((self.workspace,))
        except UserError:
            self.notify(
                f"no probe set: write questions, one a line, in {self.workspace / 'probes.txt'}",
                severity="warning",
            )
            return []
        try:
            return read_probes(path)
        except UserError as exc:
            self.notify(str(exc), severity="warning")
            return []

    # ------------------------------------------------------------ settings flow

    @on(ParamsPane.Changed)
    def _params_changed(self, event: ParamsPane.Changed) -> None:
        self.dataset_pane.settings_changed()
        self.schedule_estimate()

    @on(DatasetPane.SettingsEdited)
    def _dataset_settings(self, event: DatasetPane.SettingsEdited) -> None:
        params = self._main.query_one(ParamsPane)
        params.refresh_fields(event.names)
        params.saver.poke()
        self.schedule_estimate()

    @on(DatasetPane.DirtyChanged)
    def _dirty(self, event: DatasetPane.DirtyChanged) -> None:
        if not self.screen_stack:  # the app is closing: the message outlived its screens
            return
        tab = self._main.query_one(TabbedContent).get_tab("dataset")
        tab.label = "1 Dataset ●" if event.dirty else "1 Dataset"

    @on(CheckpointList.Chosen)
    def _chat_with(self, event: CheckpointList.Chosen) -> None:
        targets = [ColumnChoice(BASE, BASE), ColumnChoice(event.path, column_label(event.path))]
        self.chat_pane.set_targets(targets, by_person=True)
        self.action_show_pane("chat")

    # ------------------------------------------------------------ app actions

    def _show_once_tabs_settle(self, pane: str) -> None:
        """Show `pane` once the tabs have taken their first tab: until TabbedContent has handled
        that activation (its `active` is still empty) the message is queued, and handling it after
        this would switch back to the first pane."""
        if not self._main.query_one(TabbedContent).active:
            self.call_after_refresh(self._show_once_tabs_settle, pane)
            return
        self.action_show_pane(pane)

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        # A dialog belongs to the pane it was opened over: switching that pane behind it (F2-F6,
        # or a digit its focused widget does not type) would hide where its answer goes.
        if action == "show_pane" and isinstance(self.screen, ModalScreen):
            return False
        return True

    def action_show_pane(self, pane: str) -> None:
        self._main.query_one(TabbedContent).active = pane
        # The form itself rather than its first field: a digit pressed next must switch panes,
        # not type into a field. Chat opens in its prompt, ready for a question.
        focus = {
            "dataset": "#sample-table",
            "params": "#param-form",
            "gpu": "#gpu-body",
            "train": "#checkpoints",
            "chat": "#chat-prompt",
        }[pane]
        self._main.query_one(focus).focus()

    @on(TabbedContent.TabActivated)
    def _tab_activated(self, event: TabbedContent.TabActivated) -> None:
        if event.pane.id == "gpu":
            self.schedule_estimate()

    def help_sections(self) -> list[HelpSection]:
        from .screens.sample_editor import SampleEditor

        everywhere = [b for b in self.BINDINGS if isinstance(b, Binding)]
        everywhere.append(Binding("ctrl+p", "command_palette", "Search every action (command palette)"))
        sections = [HelpSection("Everywhere", everywhere, GLOBAL_HELP_KEYS)]
        for _, title, cls in PANES:
            bindings = [b for b in cls.BINDINGS if isinstance(b, Binding)]
            sections.append(HelpSection(title, bindings, getattr(cls, "HELP_KEYS", ())))
        sections.append(HelpSection("Sample editor", list(SampleEditor.BINDINGS), SampleEditor.HELP_KEYS))
        return sections

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen(self.help_sections()))

    def action_take_control(self) -> None:
        if self.client.connected:
            self.client.take_control()

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        yield SystemCommand("Help: keys", "Every key, per pane", self.action_help)
        yield SystemCommand(
            "Engine: take control",
            "Control this workspace from here (another session turns read-only)",
            self.action_take_control,
        )
        yield SystemCommand("Engine: restart", "Start the engine again if it stopped", self.connect_engine)
        if self.deployment is None:
            yield SystemCommand(
                "Deploy: start",
                "Serve the Chat pane's base and adapters over an OpenAI-compatible API on 127.0.0.1",
                self.action_deploy_start,
            )
        else:
            yield SystemCommand(
                "Deploy: stop", f"Stop serving at {self.deployment.plan.url}", self.action_deploy_stop
            )
        yield SystemCommand(
            "Deploy: copy command",
            "Copy the `tunebench deploy ...` command that serves the Chat pane's columns",
            self.action_deploy_copy,
        )
        for pane, title, cls in PANES:
            yield SystemCommand(
                f"Go to {title}", f"Show the {title} pane", lambda p=pane: self.action_show_pane(p)
            )
            for binding in cls.BINDINGS:
                # Moving the focus in or out of a text field means nothing from the palette.
                if not isinstance(binding, Binding) or binding.action.startswith(("focus_", "leave_")):
                    continue
                key = f"key {self.get_key_display(binding)}"
                yield SystemCommand(
                    f"{title}: {binding.description}",
                    f"{binding.tooltip} · {key}" if binding.tooltip else key,
                    lambda p=pane, a=binding.action: self._run_pane_action(p, a),
                )

    # ------------------------------------------------------------ deployment

    def _deploy_plan(self, port: int):
        return plan_deploy(self.chat_pane.targets, self.settings.config.model, port)

    def action_deploy_start(self) -> None:
        if self.deployment is not None:
            return
        plan = self._deploy_plan(free_port())
        options = {"popen": self.deploy_popen} if self.deploy_popen else {}
        deployment = DeployProcess(plan, self.workspace_info.state_dir / "deploy.log", **options)
        try:
            deployment.start(self.workspace)
        except OSError as exc:
            self.notify(f"could not start `{plan.command}`: {exc}", severity="error")
            return
        self.deployment = deployment
        self.status_bar.set_deploy(f"deploy starting on {plan.url} (loading the model)")
        self.notify(f"deploying: {plan.command}", timeout=6)
        self._deploy_timer = self.set_interval(1.0, self._poll_deployment)

    def action_deploy_stop(self) -> None:
        deployment, self.deployment = self.deployment, None
        if self._deploy_timer is not None:
            self._deploy_timer.stop()
            self._deploy_timer = None
        self.status_bar.set_deploy("")
        if deployment is not None:
            self._stop_deployment(deployment)
            self.notify(f"stopped serving at {deployment.plan.url}")

    @work(thread=True, group="deploy-stop", exit_on_error=False)
    def _stop_deployment(self, deployment: DeployProcess) -> None:
        deployment.stop()  # waits for open answers: off the UI thread

    def action_deploy_copy(self) -> None:
        plan = self.deployment.plan if self.deployment else self._deploy_plan(free_port())
        self.copy_to_clipboard(plan.command)
        self.notify(f"copied: {plan.command}", timeout=8)

    @work(thread=True, exclusive=True, group="deploy-poll", exit_on_error=False)
    def _poll_deployment(self) -> None:
        deployment = self.deployment
        if deployment is not None:
            state = deployment.poll()  # HTTP to the child: off the UI thread
            self.call_from_thread(self._show_deployment, deployment, state)

    def _show_deployment(self, deployment: DeployProcess, state: DeployState) -> None:
        if deployment is not self.deployment:
            return  # stopped meanwhile
        url = deployment.plan.url
        if state.phase == "serving":
            busy = f"{state.running} requests running" + (
                f", {state.waiting} waiting" if state.waiting else ""
            )
            self.status_bar.set_deploy(f"deploy {url}/v1 {', '.join(state.names)} · {busy}")
        elif state.phase == "starting":
            self.status_bar.set_deploy(f"deploy starting on {url} ({state.detail})")
        else:
            self.action_deploy_stop()
            log = self.workspace_info.state_dir / "deploy.log"
            self.notify(
                f"the deployment ended: {state.detail or 'no message'} (log: {log})", severity="error"
            )

    def _run_pane_action(self, pane: str, action: str) -> None:
        self.action_show_pane(pane)
        widget = self._main.query_one(f"#{pane}-pane")
        self.call_after_refresh(self.run_action, action, widget)

    async def on_unmount(self) -> None:
        await self.client.close()  # the engine keeps running; only this connection goes

    async def action_quit(self) -> None:
        # Closing the TUI leaves the engine (and a training run in it) going; edits are saved first.
        # A deployment started here belongs to this session and stops with it.
        if self.deployment is not None:
            self.deployment.stop()
            self.deployment = None
        self.dataset_pane.flush()
        self._main.query_one(ParamsPane).saver.flush()
        self.farewell = self._farewell()
        await self.client.close()
        self.exit(0)

    def _farewell(self) -> str:
        """What the terminal shows after the app: where the engine went and how to get back."""
        pid = self.client.engine_pid
        if not pid or not self.client.connected:  # lost, or stopped: nothing stays up
            return ""
        where = "" if self.workspace == Path.cwd() else f" {self.workspace}"
        if self.status_bar.job == "train":
            return (
                f"training goes on in the engine (pid {pid}): `tunebench{where}` reattaches, "
                f"`tunebench status{where}` shows progress, "
                f"`tunebench stop{where}` stops it with a checkpoint"
            )
        minutes = ENGINE_IDLE_EXIT_S / 60
        return (
            f"the engine (pid {pid}) stays up {minutes:.0f} min for a quick return, then frees its "
            f"memory; `tunebench stop{where}` frees it now"
        )


def run(workspace: Path, model: str | None = None) -> int:
    """Open the workbench on `workspace` (created if new); returns the exit status."""
    app = TuneBenchApp(Path(workspace).expanduser().resolve(), model)
    result = app.run()
    if app.farewell:
        print(app.farewell)
    return result or 0
