"""A plugin's state as its host's agent sees it: runnable or not (and why), running (pid, user), exited,
in a crash loop (with its last exit). Kept under `<host>.<plugin>` in the plugin-state bucket, written by
the agent only, read by `tuxpilot status`."""

from __future__ import annotations

from typing import Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from tuxpilot.protocol.models import Doc, Token, now

State = Literal["not_runnable", "refused", "starting", "running", "exited", "crash_loop", "stopped"]
# Most a state document may be: a reason of a few lines, never a log.
MAX_STATE_BYTES = 16 * 1024


class Exit(BaseModel):
    model_config = ConfigDict(extra="forbid")

    exit_code: int | None = None
    signal: str | None = None
    at: AwareDatetime = Field(default_factory=now)


class PluginState(Doc):
    host: Token
    plugin: Token
    state: State
    runtime: str | None = None
    reason: str | None = Field(None, description="Why not runnable, refused or looping, in one line.")
    pid: int | None = Field(None, description="The process the host started, while it runs.")
    user: str | None = Field(None, description="The Unix user the host runs it as.")
    restarts: int = 0
    last_exit: Exit | None = None
    time: AwareDatetime = Field(default_factory=now)

    @property
    def runnable(self) -> bool:
        return self.state not in ("not_runnable", "refused")
