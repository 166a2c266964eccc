"""One job's worker process for the window: a QProcess that never blocks the event loop.

The worker (`python -m studio.worker`) runs in its own session, so a cancel reaches any child it starts;
the job goes to its stdin in one write, and its stdout becomes typed events as the bytes arrive
(events.EventDecoder). Cancel sends SIGTERM to the process group and SIGKILL after the grace period;
closing the window kills at once. When the process ends, `ended` carries a `JobEnd` (exit status, the
last `done`/`error`, whether it was cancelled, the last stderr lines), after the job's work folder has
been removed if the worker could not remove it itself.
"""

from __future__ import annotations

import signal
import sys

from PySide6.QtCore import QObject, QProcess, QProcessEnvironment, QTimer, Signal

from studio.events import Event, EventDecoder
from studio.jobs import CANCEL_GRACE_S, Job, JobEnd, StderrTail, signal_group, worker_command

UNIX = sys.platform != "win32"


class WorkerProcess(QObject):
    event_received = Signal(object)  # a typed event from studio.events, as soon as its line is complete
    stray_line = Signal(str)  # a stdout line that is not an event
    note = Signal(str)  # something the process itself did, for the log ("killing it")
    ended = Signal(object)  # a JobEnd, once
    failed_to_start = Signal(str)  # why the worker could not start (no `ended` follows)

    def __init__(self, job: Job, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.job = job
        self.process = QProcess(self)
        self.cancelled = False
        self._decoder = EventDecoder()
        self._stderr = StderrTail()
        env = QProcessEnvironment.systemEnvironment()
        env.insert("PYTHONUNBUFFERED", "1")
        self.process.setProcessEnvironment(env)
        if UNIX:
            params = QProcess.UnixProcessParameters()
            params.flags = QProcess.UnixProcessFlag.CreateNewSession  # its own group: cancel reaches children
            self.process.setUnixProcessParameters(params)
        self.process.readyReadStandardOutput.connect(self._read_stdout)
        self.process.readyReadStandardError.connect(self._read_stderr)
        self.process.finished.connect(self._finished)
        self.process.errorOccurred.connect(self._error)

    def start(self) -> None:
        command = worker_command()
        self.process.start(command[0], command[1:])
        self.process.write(self.job.payload())
        self.process.closeWriteChannel()

    def cancel(self) -> None:
        """SIGTERM to the worker's process group now, SIGKILL if it is still there after the grace period."""
        if self.cancelled:
            return
        self.cancelled = True
        self._signal(kill=False)
        QTimer.singleShot(round(CANCEL_GRACE_S * 1000), self, self._kill_if_alive)

    def kill(self, wait_ms: int = 3000) -> None:
        """Stop the worker at once and wait for it (the window is closing); `ended` comes before this returns."""
        self.cancelled = True
        self._signal(kill=True)
        self.process.waitForFinished(wait_ms)

    def _signal(self, kill: bool) -> None:
        pid = self.process.processId()
        if UNIX and pid > 0:
            signal_group(pid, signal.SIGKILL if kill else signal.SIGTERM)
        elif kill or not UNIX:  # Windows has no SIGTERM a Python worker would act on
            self.process.kill()
        else:
            self.process.terminate()

    def _kill_if_alive(self) -> None:
        if self.process.state() != QProcess.ProcessState.NotRunning:
            self.note.emit("the worker did not stop: killing it")
            self._signal(kill=True)

    def _read_stdout(self) -> None:
        self._emit(self._decoder.feed(bytes(self.process.readAllStandardOutput().data())))

    def _read_stderr(self) -> None:
        self._stderr.feed(bytes(self.process.readAllStandardError().data()))

    def _emit(self, decoded: list[Event | str]) -> None:
        for item in decoded:
            if isinstance(item, str):
                self.stray_line.emit(item)
            else:
                self.event_received.emit(item)

    def _error(self, error: QProcess.ProcessError) -> None:
        if error == QProcess.ProcessError.FailedToStart:
            command = " ".join(worker_command())
            self.failed_to_start.emit(f"Could not start the worker ({command}): {self.process.errorString()}")
        # other errors (crash, read/write) end with `finished`, handled there

    def _finished(self, code: int, status: QProcess.ExitStatus) -> None:
        self._read_stdout()
        self._read_stderr()
        self._emit(self._decoder.close())
        self._stderr.close()
        crashed = status == QProcess.ExitStatus.CrashExit  # then `code` is the signal's number
        end = JobEnd(
            self.job,
            -code if crashed else code,
            self._decoder.outcome,
            self.cancelled,
            tuple(self._stderr.lines),
        )
        end.clean_up()
        self.ended.emit(end)
