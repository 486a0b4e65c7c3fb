"""The Cicada cold-start pipeline: MiniLoader + WeightDecoupler + priority-aware scheduling.

Lanes and who runs them::

    reader thread   read stage 0 | read stage 1 | ...            (started before `import torch`)
    main thread     import torch | construct | compute stage 0 | wait? | compute stage 1 | ...
    apply           whichever thread finds a stage's bytes verified *and* the model built

Scheduling rules, in priority order:

1. Compute on resident stages first: the forward runs on the main thread and only blocks, in a
   forward pre-hook, at a module whose stage is not resident yet.
2. I/O in order of need: the reader walks stages in execution order.
3. Construction fills the gaps: the model is built (milliseconds, MiniLoader) while the reader
   streams; stages that arrived before construction finished are applied right after it, out
   of order with respect to their arrival (whatever is there goes in).

A stage is *resident* once its bytes passed the checksum and its tensors sit in the model.
Each residency is published as a `ResidencyEvent` (callback and iterator); the coordinator's
handoff policy feeds on them. A result is only returned once every stage has checked out.

Where the bytes come from, and how compute waits for them, is the stage source's business
(cloud/loading/base.py): one per device kind, picked by `source_for(device)`; this module has no
device branches.

No wait is unbounded: a forward that waits for a stage gives up with `LoadStalledError` once no
stage has arrived for `stall_timeout` seconds, and fails the load (every waiter wakes with the
error, `on_error` listeners hear it). A failure on a loader thread, of any kind, fails the load
the same way.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cicada.cloud import collector
from cicada.cloud.loading.base import StageRead, StageSource
from cicada.cloud.loading.sources import source_for
from cicada.cloud.timeline import Timeline
from cicada.common.errors import CicadaError, LoadStalledError, PackageIntegrityError
from cicada.common.factory import check_factory_allowed
from cicada.common.package import Manifest, StageEntry, check_weights_file

if TYPE_CHECKING:
    from torch import nn

    from cicada.cloud.miniloader import Slot

log = logging.getLogger("cicada.cloud")


def log_abandon_failure(exc: Exception) -> None:
    log.warning("stopping the stage source after a failure failed: %s", exc)


# A load with no stage arriving for this long is stuck (a dead disk, a hung mount): the forward
# waiting on it fails instead of waiting for ever. Generous: one stage of a large model on a
# slow network volume can take a minute.
DEFAULT_STALL_TIMEOUT_S = 300.0
WAIT_SLICE_S = 0.5


@dataclass(frozen=True)
class ResidencyEvent:
    """Stage `stage` of `total_stages` became resident; `eta_s` estimates the rest."""

    stage: int
    name: str
    nbytes: int
    resident_stages: int
    total_stages: int
    resident_bytes: int
    total_bytes: int
    elapsed_s: float
    eta_s: float

    @property
    def done(self) -> bool:
        return self.resident_stages == self.total_stages


class ColdStart:
    """One cold start of a packaged model.

    Construct it as early as possible (it opens the package and starts reading without torch),
    then `build()` once torch is imported, then `forward(...)`.
    """

    def __init__(
        self,
        package_dir: Path | str,
        *,
        device: str = "cpu",
        timeline: Timeline | None = None,
        verify: bool = True,
        reader_threads: int | None = None,
        stall_timeout: float = DEFAULT_STALL_TIMEOUT_S,
        trust_package_code: bool = False,
        source: Callable[..., StageSource] | None = None,
    ) -> None:
        """`source`: the stage source's class (or a factory taking its arguments); by default
        the one for `device`'s kind (cloud/loading/sources.py). `reader_threads`: None for the
        source's default (CPU: 1; CUDA: one per CPU, up to 4)."""
        self.package_dir = Path(package_dir)
        self.stall_timeout = stall_timeout
        self.trust_package_code = trust_package_code
        self._progress = time.monotonic()  # when a stage last arrived (or the load began)
        self.device = device
        self.timeline = timeline or Timeline()
        self.manifest = Manifest.load(self.package_dir)
        # A factory outside the allow-list is refused before a byte of weights is read.
        check_factory_allowed(self.manifest.architecture.factory, trusted=trust_package_code)
        self.weights_path = check_weights_file(self.package_dir, self.manifest)
        stages = self.manifest.stages
        self._resident = [threading.Event() for _ in stages]
        self._error: CicadaError | None = None
        self._lock = threading.Lock()
        self._pending: list[StageRead] = []
        self._model: nn.Module | None = None
        self._slots: dict[str, list[Slot]] = {}
        self._hooks: list[Any] = []
        self._listeners: list[Callable[[ResidencyEvent], None]] = []
        self._error_listeners: list[Callable[[CicadaError], None]] = []
        self._published: list[ResidencyEvent] = []
        self._resident_bytes = 0
        self._resident_count = 0
        # Stages read and verified (not yet applied, maybe): on CPU the reader finishes long
        # before `import torch` does, and no stage can be applied before the model is built.
        self.read_stages = 0
        self.read_bytes = 0
        self._started = self.timeline.now()
        self._aliases_of: dict[str, list[str]] = {}
        for alias, target in self.manifest.aliases.items():
            self._aliases_of.setdefault(target, []).append(alias)
        # Compute-lane bookkeeping for per-stage timings (main thread only).
        self._segment_stage: int | None = None
        self._segment_start = 0.0
        self.source = (source or source_for(device))(
            self.weights_path, self.manifest, device, self.timeline,
            verify=verify, threads=reader_threads,
        )  # fmt: skip
        self.source.start(self._on_stage_read)

    # -- residency -------------------------------------------------------------------------

    def subscribe(self, listener: Callable[[ResidencyEvent], None]) -> None:
        """Call `listener` (from a loader thread) for every stage that becomes resident."""
        self._listeners.append(listener)

    def on_error(self, listener: Callable[[CicadaError], None]) -> None:
        """Call `listener` (from any thread) once if the load fails; at once if it has."""
        with self._lock:
            error = self._error
            if error is None:
                self._error_listeners.append(listener)
        if error is not None:
            listener(error)

    @property
    def error(self) -> CicadaError | None:
        """The load's failure, if it failed."""
        return self._error

    def join_loader(self, timeout: float) -> bool:
        """Wait up to `timeout` s for the load's own threads to end, as they do once it has
        finished or failed; True when none runs. Call it before a process exits after a
        failure: a loader thread still inside a torch op at interpreter exit can abort it."""
        return self.source.join(timeout)

    def residency(self, timeout: float | None = None) -> Iterator[ResidencyEvent]:
        """Every residency event, past ones first, ending when every stage is resident.

        Subscribes at once (not at the first `next()`), so nothing published in between is
        lost; raises the load's error instead of waiting for events that will never come."""
        events: queue.Queue[ResidencyEvent | CicadaError] = queue.Queue()
        with self._lock:
            for past in self._published:
                events.put(past)
            if self._error is not None:
                events.put(self._error)
            self._listeners.append(events.put)
            self._error_listeners.append(events.put)
        return self._drain(events, timeout)

    @staticmethod
    def _drain(
        events: queue.Queue[ResidencyEvent | CicadaError], timeout: float | None
    ) -> Iterator[ResidencyEvent]:
        while True:
            try:
                item = events.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(f"no residency event within {timeout} s") from None
            if isinstance(item, CicadaError):
                raise item
            yield item
            if item.done:
                return

    def read_eta(self, assumed_bps: float) -> float:
        """Seconds until every stage is read, at the rate read so far (`assumed_bps` before
        the first stage)."""
        rest = self.manifest.total_bytes - self.read_bytes
        elapsed = self.timeline.now() - self._started
        rate = self.read_bytes / elapsed if self.read_bytes and elapsed > 0 else assumed_bps
        return rest / rate

    @property
    def all_resident(self) -> bool:
        return self._error is None and all(e.is_set() for e in self._resident)

    def is_resident(self, stage: int) -> bool:
        return self._resident[stage].is_set() and self._error is None

    def wait_stage(self, stage: int, timeout: float | None = None) -> None:
        """Wait until `stage` is resident. Raises TimeoutError after `timeout` (if given), and
        fails the whole load with `LoadStalledError` once no stage has arrived for
        `stall_timeout` seconds: no wait here is unbounded."""
        event = self._resident[stage]
        deadline = None if timeout is None else time.monotonic() + timeout
        while not event.wait(WAIT_SLICE_S):
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                raise TimeoutError(f"stage {stage} not resident after {timeout} s")
            if now - self._progress > self.stall_timeout:
                name = self.manifest.stages[stage].name
                self._fail(
                    LoadStalledError(
                        f"{self.weights_path}: stage {stage} ({name}) is not resident and no "
                        f"stage has arrived for {self.stall_timeout:.0f} s: the load is stuck "
                        f"(storage not answering?); giving up"
                    )
                )
        if self._error is not None:
            raise self._error

    def wait_all(self, timeout: float | None = None) -> None:
        for i in range(len(self._resident)):
            self.wait_stage(i, timeout)

    # -- the reader's side -----------------------------------------------------------------

    def _on_stage_read(self, read: StageRead) -> None:
        self._progress = time.monotonic()
        self.timeline.add("read", read.stage.name, read.start, read.end)
        if read.error is not None:
            self._fail(read.error)
            return
        with self._lock:
            self.read_stages += 1
            self.read_bytes += read.stage.nbytes
        try:
            with self._lock:
                if self._model is None:
                    self._pending.append(read)
                    return
                self._apply(read.stage)
        except Exception as exc:  # on the loader's thread: fail the load, never lose it
            self._fail(self._apply_error(read.stage, exc))

    def _build_error(self, exc: Exception) -> CicadaError:
        if isinstance(exc, CicadaError):
            return exc
        from cicada.cloud.loading.base import load_error

        return load_error(self.weights_path, exc)

    def _apply_error(self, stage: StageEntry, exc: Exception) -> CicadaError:
        if isinstance(exc, CicadaError):
            return exc
        return PackageIntegrityError(
            f"{self.weights_path}: stage {stage.index} ({stage.name}) cannot be applied: "
            f"{type(exc).__name__}: {exc}"
        )

    def _fail(self, error: CicadaError) -> None:
        with self._lock:
            if self._error is None:
                self._error = error
            listeners = list(self._error_listeners)
        try:
            self.source.abandon()  # stop reading: nothing more is needed
        except Exception as exc:  # the load is failed either way
            log_abandon_failure(exc)
        for e in self._resident:
            e.set()  # wake every waiter; they see the error
        for listener in listeners:
            listener(error)

    # -- construction and application ------------------------------------------------------

    def build(self) -> nn.Module:
        """Construct the model (MiniLoader) and apply whatever stages already arrived."""
        from cicada.cloud.miniloader import build_model, resolve_factory
        from cicada.cloud.packing import check_coverage

        arch = self.manifest.architecture
        trusted = self.trust_package_code
        with self.timeline.span("import", "model code"):
            resolve_factory(arch.factory, trusted=trusted)
        try:
            # No collection in here: construction allocates thousands of objects, enough to
            # set off a full one that walks everything `import torch` left (cloud/collector.py).
            with collector.paused(), self.timeline.span("construct", "construct"):
                with self.source.construction():
                    model = build_model(arch.factory, arch.config, init=False, trusted=trusted)
                self._slots = check_coverage(model, self.manifest)
                self._install_hooks(model)
            self.source.attach(self._slots)
        except Exception as exc:  # every waiter and listener hears it, not just this caller
            self._fail(self._build_error(exc))
            raise
        with self._lock:
            self._model = model
            pending, self._pending = self._pending, []
        for read in pending:
            try:
                with self._lock:
                    self._apply(read.stage)
            except Exception as exc:
                error = self._apply_error(read.stage, exc)
                self._fail(error)
                raise error from None
        return model

    def _apply(self, stage: StageEntry) -> None:
        """Put a verified stage's tensors into the model (caller holds the lock)."""
        if self.source.in_place:  # the source wrote them into the model's storage itself
            self._publish(stage)
            return
        from torch import nn

        aliases_of = self._aliases_of
        start = self.timeline.now()
        for name, tensor in self.source.tensors(stage):
            new_param: nn.Parameter | None = None
            for slot_name in (name, *aliases_of.get(name, ())):
                for slot in self._slots[slot_name]:
                    if slot.is_parameter:
                        # One Parameter object for every tied slot keeps the tie.
                        if new_param is None:
                            new_param = nn.Parameter(tensor, requires_grad=False)
                        slot.module._parameters[slot.attr] = new_param
                    else:
                        slot.module._buffers[slot.attr] = tensor
        self.timeline.add("apply", stage.name, start, self.timeline.now())
        self._publish(stage)

    def _publish(self, stage: StageEntry) -> None:
        """Record and announce a resident stage (caller holds the lock)."""
        self._resident_bytes += stage.nbytes
        self._resident_count += 1
        elapsed = self.timeline.now() - self._started
        rest = self.manifest.total_bytes - self._resident_bytes
        rate = self._resident_bytes / elapsed if elapsed > 0 else 0.0
        event = ResidencyEvent(
            stage=stage.index, name=stage.name, nbytes=stage.nbytes,
            resident_stages=self._resident_count, total_stages=len(self._resident),
            resident_bytes=self._resident_bytes, total_bytes=self.manifest.total_bytes,
            elapsed_s=elapsed, eta_s=rest / rate if rate > 0 else float("inf"),
        )  # fmt: skip
        self._published.append(event)
        self._resident[stage.index].set()
        for listener in list(self._listeners):
            listener(event)

    # -- execution -------------------------------------------------------------------------

    def _install_hooks(self, model: nn.Module) -> None:
        """A pre-hook on every module that owns tensors waits for those tensors' stages."""
        stage_of: dict[str, int] = {}
        for stage in self.manifest.stages:
            for t in stage.tensors:
                stage_of[t.name] = stage.index
        for alias, target in self.manifest.aliases.items():
            stage_of[alias] = stage_of[target]
        for path, module in model.named_modules():
            prefix = f"{path}." if path else ""
            owned = [*module._parameters, *module._buffers]
            needs = sorted({stage_of[prefix + a] for a in owned if prefix + a in stage_of})
            if needs:
                self._hooks.append(module.register_forward_pre_hook(self._make_hook(needs)))

    def _make_hook(self, stages: list[int]) -> Callable[..., None]:
        def wait_for_stages(module: nn.Module, args: Any) -> None:
            self._enter_stage(stages[-1])
            for s in stages:
                if not self._resident[s].is_set():
                    start = self.timeline.now()
                    self.wait_stage(s)
                    now = self.timeline.now()
                    self.timeline.add("wait", self.manifest.stages[s].name, start, now)
                    self._segment_start = now
                elif self._error is not None:
                    raise self._error
            self.source.order_compute_after(stages)

        return wait_for_stages

    def _enter_stage(self, stage: int) -> None:
        if stage == self._segment_stage:
            return
        now = self.timeline.now()
        if self._segment_stage is not None:
            name = self.manifest.stages[self._segment_stage].name
            self.timeline.add("compute", name, self._segment_start, now)
        self._segment_stage, self._segment_start = stage, now

    def _close_compute(self) -> None:
        if self._segment_stage is not None:
            self.source.synchronize()
            name = self.manifest.stages[self._segment_stage].name
            self.timeline.add("compute", name, self._segment_start, self.timeline.now())
        self._segment_stage = None

    def forward(self, *inputs: Any, **kwargs: Any) -> Any:
        """Run the model; blocks only where a stage is not resident. Returns once every stage
        has checked out, so no unverified byte is ever part of a released result."""
        return self.call(None, *inputs, **kwargs)

    def call(self, method: str | None, *inputs: Any, **kwargs: Any) -> Any:
        """As `forward`, through another method of the model (e.g. a cached decode step)."""
        import torch

        if self._model is None:
            self.build()
        assert self._model is not None
        fn = self._model if method is None else getattr(self._model, method)
        with torch.inference_mode():
            try:
                out = fn(*inputs, **kwargs)
            finally:
                self._close_compute()
        self.wait_all()
        self.remove_hooks()
        return out

    @property
    def model(self) -> nn.Module:
        if self._model is None:
            raise RuntimeError("build() has not run yet")
        return self._model

    def remove_hooks(self) -> None:
        """Once everything is resident the hooks only cost time: drop them."""
        if self.all_resident and self._error is None:
            for h in self._hooks:
                h.remove()
            self._hooks.clear()
