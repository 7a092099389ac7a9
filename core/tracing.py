"""OpenTelemetry traces (the ``[otel]`` extra): a span per request, children for its steps.

Off by default (``otel_enabled``).  Off, ``OFF`` stands in: its ``span()`` returns one constant
no-op object, ``create_app`` adds no middleware and the store is not wrapped, so a request pays
nothing but a few calls of that object's ``__enter__``/``__exit__`` (measured in the note), and
nothing of ``opentelemetry`` is imported (a test checks ``sys.modules``).

On, each ``Server`` has its own ``TracerProvider`` (made in ``Server.start``, so with
``serve --workers N`` in each worker, after the worker started; shut down, which flushes the
batch processor, in ``Server.stop``).  The exporter and the resource come from the standard
``OTEL_*`` variables, read by the SDK: ``OTLPSpanExporter()`` with no arguments (endpoint,
headers, protocol details, timeout), ``BatchSpanProcessor`` (``OTEL_BSP_*``), the sampler
(``OTEL_TRACES_SAMPLER``), ``OTEL_SERVICE_NAME``/``OTEL_RESOURCE_ATTRIBUTES`` (``service.name``
is ``ssa-server`` unless they name one); ``OTEL_SDK_DISABLED=true`` keeps tracing off.  The
global tracer provider is left alone: a test's servers each keep their own.

Spans (their names are fixed words, never a value from the request):

- ``TraceRequests``: the request, SERVER kind, named ``METHOD /route/template``, with the W3C
  ``traceparent`` of the request as its parent (the configured propagators, W3C trace context by
  default); ``http.request.method``, ``http.route``, ``http.response.status_code``,
  ``ssa.request_id``, ``ssa.client_id``.  Not ``url.path``: the raw path is whatever the client
  sent (a token pasted there included); the route template says which endpoint it was.
- ``auth`` (token verification and scope), ``validation`` (body read and parsed), ``scripts.HOOK``
  with a ``script.HOOK`` child per script of the chain, ``sign`` (``ssa.signing.alg``,
  ``ssa.signing.kid``), ``store.OP`` (``ssa.store.op``, ``ssa.store.backend``).

No attribute carries a token, a secret, a key or an SSA: the attributes are the ones above (a
jti and a client_id are fine in a trace, unlike in a metric label).  An exception is recorded by
its type only (``record_exception`` off: its message might quote input).
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .observe import CURRENT, UNMATCHED

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter, SpanProcessor
    from opentelemetry.trace import Span

SERVICE_NAME = "ssa-server"
INSTRUMENTATION = "ssa_server"
_REQUEST_ID = b"x-request-id"


class NoSpan:
    """The span of tracing that is off: every method does nothing; one instance (``NO_SPAN``)."""

    __slots__ = ()

    def __enter__(self) -> NoSpan:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def set_attribute(self, key: str, value: Any) -> None:
        return None


NO_SPAN = NoSpan()


class Tracing:
    """Tracing off (``OFF``): the interface the modules call, doing nothing."""

    enabled = False

    def span(self, name: str, attributes: Mapping[str, Any] | None = None) -> Any:
        """A context manager around one step, yielding the span (``set_attribute``)."""
        return NO_SPAN

    def record(self, name: str, attributes: Mapping[str, Any], start: float, end: float) -> None:
        """A finished child span of the current one, from ``time.perf_counter`` readings (a
        step timed elsewhere: the scripts of a chain run in one sandbox round trip)."""
        return None

    def start(self) -> None:
        """Make the provider (``Server.start``, in the process that serves)."""

    def shutdown(self) -> None:
        """Flush what is batched and stop the exporter (``Server.stop``)."""


OFF = Tracing()


def sdk_disabled(environ: Mapping[str, str]) -> bool:
    return environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"


def from_settings(settings: Any, environ: Mapping[str, str] | None = None) -> Tracing:
    """``OFF`` unless ``otel_enabled`` (and not ``OTEL_SDK_DISABLED``); on, the SDK is imported
    here and the exporter configured from the ``OTEL_*`` variables when the server starts."""
    env = os.environ if environ is None else environ
    if not settings.otel_enabled or sdk_disabled(env):
        return OFF
    return OtelTracing()


class OtelTracing(Tracing):
    """Tracing on, with the OpenTelemetry SDK.  ``exporter``/``processor`` for tests (the SDK's
    in-memory exporter); otherwise ``OTLPSpanExporter()`` in a ``BatchSpanProcessor``."""

    enabled = True

    def __init__(self, *, exporter: SpanExporter | None = None,
                 processor: SpanProcessor | None = None) -> None:
        try:
            from opentelemetry import context, propagate, trace
            from opentelemetry.sdk.trace import TracerProvider  # noqa: F401 (fail here, not at start)
        except ImportError:
            from .settings import SettingsError

            raise SettingsError("SSA_OTEL_ENABLED needs the OpenTelemetry SDK: pip install "
                                "'ssa-server[otel]'") from None
        self._trace = trace
        self._context = context
        self._propagate = propagate
        self._exporter = exporter
        self._processor = processor
        self.provider: TracerProvider | None = None
        self._tracer: Any = None
        self._offset_ns = 0  # time.time_ns() - perf_counter_ns(), for ``record``

    def start(self) -> None:
        if self.provider is not None:
            return
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider

        # process.pid tells serve --workers N's workers apart; OTEL_RESOURCE_ATTRIBUTES win over it.
        resource = Resource({"process.pid": os.getpid()}).merge(Resource.create())
        if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
            resource = resource.merge(Resource({"service.name": SERVICE_NAME}))
        provider = TracerProvider(resource=resource)  # the sampler and span limits from OTEL_*
        processor = self._processor
        if processor is None:
            from opentelemetry.sdk.trace.export import BatchSpanProcessor

            if self._exporter is None:
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

                self._exporter = OTLPSpanExporter()  # endpoint, headers, timeout: OTEL_EXPORTER_OTLP_*
            processor = BatchSpanProcessor(self._exporter)
        provider.add_span_processor(processor)
        self.provider = provider
        self._tracer = provider.get_tracer(INSTRUMENTATION)
        self._offset_ns = time.time_ns() - time.perf_counter_ns()

    def shutdown(self) -> None:
        provider, self.provider, self._tracer = self.provider, None, None
        if provider is not None:
            provider.shutdown()  # the batch processor exports what it holds

    def span(self, name: str, attributes: Mapping[str, Any] | None = None) -> Any:
        tracer = self._tracer
        if tracer is None:  # built but not started (CLI commands): nothing to export to
            return NO_SPAN
        return _step(tracer, self._trace, name, attributes)

    def record(self, name: str, attributes: Mapping[str, Any], start: float, end: float) -> None:
        tracer = self._tracer
        if tracer is None:
            return
        span = tracer.start_span(name, attributes=attributes, record_exception=False,
                                 start_time=self._offset_ns + int(start * 1e9))
        span.end(end_time=self._offset_ns + int(end * 1e9))

    @contextmanager
    def request_span(self, scope: Scope) -> Iterator[Span | None]:
        """The SERVER span of one request, its parent from the request's ``traceparent``."""
        tracer = self._tracer
        if tracer is None:
            yield None
            return
        carrier: dict[str, str] = {}
        for name, value in scope["headers"]:
            if name in (b"traceparent", b"tracestate", b"baggage"):
                carrier[name.decode("latin-1")] = value.decode("latin-1")
        parent = self._propagate.extract(carrier) if carrier else None
        method = scope["method"]
        with tracer.start_as_current_span(
                method, context=parent, kind=self._trace.SpanKind.SERVER, record_exception=False,
                set_status_on_exception=False,
                attributes={"http.request.method": method}) as span:
            yield span


@contextmanager
def _step(tracer: Any, trace: Any, name: str, attributes: Mapping[str, Any] | None) -> Iterator[Any]:
    """A child span of the current one; an exception marks it ERROR with its type (not its text)."""
    with tracer.start_as_current_span(name, attributes=attributes, record_exception=False,
                                      set_status_on_exception=False) as span:
        try:
            yield span
        except BaseException as e:
            span.set_attribute("error.type", type(e).__name__)
            span.set_status(trace.Status(trace.StatusCode.ERROR))
            raise


class TraceRequests:
    """The request span (pure ASGI), outside ``ObserveRequests``: added by ``create_app`` only
    when tracing is on.  The route template is known once the router ran, the request id and
    the client once the response starts (``observe.CURRENT``)."""

    def __init__(self, app: ASGIApp, tracing: OtelTracing) -> None:
        self.app = app
        self.tracing = tracing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        with self.tracing.request_span(scope) as span:
            if span is None:
                await self.app(scope, receive, send)
                return
            status = 500  # unless a response starts

            async def send_traced(message: Message) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                    _note_request(span, message)
                await send(message)

            try:
                await self.app(scope, receive, send_traced)
            except BaseException as e:
                span.set_attribute("error.type", type(e).__name__)
                raise
            finally:
                route = scope.get("route")
                template = getattr(route, "path", None) or UNMATCHED
                span.update_name(f"{scope['method']} {template}")
                span.set_attribute("http.route", template)
                span.set_attribute("http.response.status_code", status)
                if status >= 500:  # a server span's error (4xx is the client's)
                    span.set_attribute("error.type", str(status))
                    span.set_status(self.tracing._trace.Status(self.tracing._trace.StatusCode.ERROR))


def _note_request(span: Span, message: Message) -> None:
    """The request id as the response carries it, and the authenticated client."""
    for name, value in message.get("headers", ()):
        if name == _REQUEST_ID:
            span.set_attribute("ssa.request_id", value.decode("latin-1"))
    info = CURRENT.get()
    if info is not None and info.client_id is not None:
        span.set_attribute("ssa.client_id", info.client_id)


def traced(method: Callable[..., Awaitable[Any]], tracing: Tracing, name: str,
           attributes: Mapping[str, Any]) -> Callable[..., Awaitable[Any]]:
    """``method`` (a store operation) inside a span (``metrics.TimedStore``, tracing on)."""

    async def in_span(*args: Any, **kwargs: Any) -> Any:
        with tracing.span(name, attributes):
            return await method(*args, **kwargs)

    return in_span
