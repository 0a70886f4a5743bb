# -*- test-case-name: tests.test_tlsproto -*-
"""
A TLS transport that can be half-closed, for a proxy that forwards EOF.

Twisted's L{TLSMemoryBIOProtocol} treats TLS as all-or-nothing: when the peer's
close_notify arrives it closes the whole connection, and C{loseWriteConnection}
falls through to the TCP transport underneath, which sends a FIN without a
close_notify (a truncation attack, as far as the peer can tell).

TLS 1.3 (RFC 8446, section 6.1) makes each direction independent: a
close_notify "does not have any effect on [the] read side of the connection".
L{HalfCloseTLSProtocol} uses that:

  - On TLS 1.3, when the peer's close_notify arrives and the wrapped protocol
    provides L{IHalfCloseableProtocol}, the wrapped protocol gets
    C{readConnectionLost()} and may go on writing.
  - C{loseWriteConnection()} sends close_notify (one C{SSL_shutdown}) after any
    buffered data and goes on reading until the peer's close_notify (or its
    TCP FIN); the TCP connection is closed once both close_notify alerts have
    been exchanged.
  - On TLS 1.2 a received close_notify closes both directions, as RFC 5246
    requires and as Twisted always did.  Sending one (C{loseWriteConnection})
    works the same as on TLS 1.3: an RFC 5246 peer answers with its own
    close_notify and the connection closes.

It also fixes two things a relay runs into when the TLS transport is used as a
producer: C{stopProducing()} closes with close_notify instead of dropping the
TCP connection underneath, and C{loseConnection()} makes sure the TCP transport
is reading, since a TLS close waits for the peer's close_notify.

Handshake failures are reported once, through L{HalfCloseTLSProtocol.handshakeFailed},
which calls the C{handshakeFailed} callback given to L{HalfCloseTLSFactory}:
that is where verification logging plugs in.

This module relies on private details of L{TLSMemoryBIOProtocol}
(C{_tlsConnection}, C{_flushReceiveBIO}, C{_flushSendBIO}, C{_shutdownTLS},
C{_tlsShutdownFinished}, C{_appSendBuffer}); they have been stable for a long
time and C{tests.test_tlsproto} pins the behaviour that depends on them.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from OpenSSL.SSL import SENT_SHUTDOWN, Connection, Error, WantReadError, ZeroReturnError
from twisted.internet.interfaces import (
    IHalfCloseableProtocol,
    IProtocolFactory,
    IPushProducer,
    IReactorTime,
)
from twisted.logger import Logger
from twisted.internet.protocol import Protocol
from twisted.internet.tcp import Connection as _TCPConnection
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import directlyProvides, implementer, providedBy

try:
    from OpenSSL._util import ffi as _ffi, lib as _lib
except ImportError:  # pragma: no cover - a pyOpenSSL without its bindings module
    _ffi = _lib = None

__all__ = [
    "HalfCloseTLSProtocol",
    "HalfCloseTLSFactory",
    "HandshakeFailureHandler",
    "TLS13",
    "RECORD_BATCH_SIZE",
    "writeNow",
]

TLS13 = "TLSv1.3"
"""
The protocol version name OpenSSL reports for TLS 1.3, the only version on
which a received close_notify closes just one direction.
"""

HandshakeFailureHandler = Callable[["HalfCloseTLSProtocol", Failure], object]
"""
The type of L{HalfCloseTLSFactory}'s C{handshakeFailed} callback: it receives
the TLS protocol (its C{getHandle()} is still usable) and the reason.
"""

RECORD_BATCH_SIZE = 2**18
"""
Most bytes moved between OpenSSL and Python in one go: decrypted records are
read until this many bytes or no complete record is left, and delivered to
the wrapped protocol as one chunk; encrypted bytes are taken out of the
memory BIO in chunks of this size.  (Twisted's L{TLSMemoryBIOProtocol}
reads one record, at most 16 KiB, per call and delivers each on its own;
a relay then writes each to the other side on its own.)
"""

RELEASE_AFTER = 2**14
"""
After its handshake, and L{RELEASE_DELAY} seconds after a chunk at least
this large went through them, a connection's memory BIOs are replaced by
empty ones (L{_BatchIO.releaseBuffers}), so that a connection that goes idle
does not keep the memory its largest chunk needed.
"""

RELEASE_DELAY = 1.0
"""
Seconds between a large chunk and giving the BIOs' memory back: at most
once per second per busy connection (regrowing them right away for every
chunk of a bulk transfer would cost more than it saves).
"""


_WANT_READ = WantReadError()
"""
The one L{WantReadError} that L{_BatchIO.readRecords} reports "no complete
record left" with, at the end of nearly every read: it is never raised, so
it carries no traceback.
"""


def _withoutTraceback(error: Error) -> Error:
    """
    C{error}, caught, without its traceback.

    An exception kept after its C{except} block holds its traceback, whose
    frames hold the local variable that keeps the exception: a reference
    cycle that only the cyclic garbage collector frees.  Made once per read,
    those cycles (with every frame of the reactor's stack, which Python
    materialises for the traceback) made the collector run tens of times a
    second on a busy proxy, each run a pause of up to milliseconds for every
    connection.
    """
    error.__traceback__ = None
    return error


def _problemOf(connection: Connection, ssl: Any, result: int) -> Error:
    """
    Why C{SSL_read} on C{connection} returned C{result} (0 or less): the
    exception pyOpenSSL would raise, without raising one in the common
    case (L{_WANT_READ}) and without a traceback in the others.
    """
    if _lib.SSL_get_error(ssl, result) == _lib.SSL_ERROR_WANT_READ:
        return _WANT_READ
    try:
        connection._raise_ssl_error(ssl, result)
    except Error as e:
        return _withoutTraceback(e)
    return _WANT_READ


class _BatchIO:
    """
    Moves bytes between a memory-BIO L{Connection} and Python with one copy
    and no exception per record, through a buffer allocated once.

    pyOpenSSL's C{Connection.recv} and C{bio_read} allocate a buffer per call
    and C{recv} raises L{WantReadError} at the end of every read;
    C{SSL_read} and C{BIO_read} here are the same OpenSSL calls pyOpenSSL
    makes, and an error is turned into the same exception pyOpenSSL would
    raise (its C{_raise_ssl_error}, C{_handle_bio_errors}).  Where those
    private details are missing, the public methods are used instead.

    The buffer is shared: the reactor runs one callback at a time and every
    result is copied out before anything else can read.
    """

    def __init__(self) -> None:
        self.available = (
            _ffi is not None
            and hasattr(Connection, "_raise_ssl_error")
            and hasattr(Connection, "_handle_bio_errors")
        )
        self.buffer: Any = _ffi.new("char[]", RECORD_BATCH_SIZE) if self.available else None

    def readRecords(self, connection: Connection) -> tuple[bytes, Optional[Error]]:
        """
        Decrypt what complete records are in the receive BIO, up to
        L{RECORD_BATCH_SIZE} bytes.

        @return: The cleartext (possibly empty) and, if reading stopped
            before the batch was full, why: L{WantReadError} (no complete
            record left), L{ZeroReturnError} (the peer's close_notify) or
            another L{Error}.
        """
        ssl = getattr(connection, "_ssl", None)
        if not self.available or ssl is None:
            return self._readRecordsSlowly(connection)
        read = _lib.SSL_read
        buffer = self.buffer
        got = 0
        result = 1
        while got < RECORD_BATCH_SIZE:
            result = read(ssl, buffer + got, RECORD_BATCH_SIZE - got)
            if result <= 0:
                break
            got += result
        problem: Optional[Error] = None
        if result <= 0:
            problem = _problemOf(connection, ssl, result)
        return (_ffi.buffer(buffer, got)[:] if got else b"", problem)

    def _readRecordsSlowly(self, connection: Connection) -> tuple[bytes, Optional[Error]]:
        chunks = []
        size = 0
        problem: Optional[Error] = None
        while size < RECORD_BATCH_SIZE:
            try:
                chunk = connection.recv(2**15)
            except Error as e:
                problem = _withoutTraceback(e)
                break
            chunks.append(chunk)
            size += len(chunk)
        return (b"".join(chunks), problem)

    def releaseBuffers(self, connection: Connection) -> bool:
        """
        Give the connection new, empty memory BIOs if both are drained.

        A memory BIO's buffer grows to the most it ever held and is never
        given back: a connection that once moved a large chunk, or that
        just took a handshake's certificate chain, would keep that much
        memory for as long as it stays open.  Replacing the BIOs
        (C{SSL_set_bio} frees the old ones) costs two allocations.

        @return: Whether the BIOs were replaced.
        """
        if not self.available:
            return False
        ssl = getattr(connection, "_ssl", None)
        into = getattr(connection, "_into_ssl", None)
        out = getattr(connection, "_from_ssl", None)
        if ssl is None or into is None or out is None:
            return False
        if _lib.BIO_get_mem_data(into, _ffi.NULL) or _lib.BIO_get_mem_data(out, _ffi.NULL):
            return False
        newInto = _lib.BIO_new(_lib.BIO_s_mem())
        newOut = _lib.BIO_new(_lib.BIO_s_mem())
        if newInto == _ffi.NULL or newOut == _ffi.NULL:
            for bio in (newInto, newOut):
                if bio != _ffi.NULL:
                    _lib.BIO_free(bio)
            return False
        _lib.SSL_set_bio(ssl, newInto, newOut)
        connection._into_ssl = newInto
        connection._from_ssl = newOut
        return True

    def readSent(self, connection: Connection) -> list[bytes]:
        """
        Take everything OpenSSL has written to the send BIO.
        """
        chunks = []
        bio = getattr(connection, "_from_ssl", None)
        if not self.available or bio is None:
            while True:
                try:
                    chunks.append(connection.bio_read(RECORD_BATCH_SIZE))
                except WantReadError:
                    return chunks
        read = _lib.BIO_read
        buffer = self.buffer
        while True:
            result = read(bio, buffer, RECORD_BATCH_SIZE)
            if result <= 0:
                if _lib.BIO_should_retry(bio) and _lib.BIO_should_read(bio):
                    # Empty: what pyOpenSSL would report as WantReadError.
                    return chunks
                try:
                    connection._handle_bio_errors(bio, result)
                except WantReadError:
                    pass
                return chunks
            chunks.append(_ffi.buffer(buffer, result)[:])
            if result < RECORD_BATCH_SIZE:
                return chunks


_batchIO = _BatchIO()


def writeNow(transport: Any, data: bytes) -> None:
    """
    Write C{data} to a transport, sending at once what the socket takes when
    nothing is waiting in the transport's buffer.

    A Twisted TCP transport's C{write} only buffers: the bytes are sent from
    the next reactor iteration, after registering for writability (and
    unregistering once sent), and bytes that keep arriving are copied into
    an ever-growing buffer before being sent.  For a relay, where each read
    on one side is one write on the other, sending straight away saves the
    extra iteration (latency), two C{epoll_ctl} calls and the copies.
    Whatever the socket does not take, and any write to another kind of
    transport (TLS, a test transport) or to a transport with buffered data,
    half-closed or closing, goes through its C{write} as usual: order,
    flow control (the producer is paused by C{write} when its buffer fills)
    and error handling stay Twisted's.
    """
    if (
        isinstance(transport, _TCPConnection)
        and transport.connected
        and not transport.disconnecting
        and not transport._writeDisconnected
        and not transport._tempDataBuffer
        and len(transport.dataBuffer) == transport.offset
        and not getattr(transport, "TLS", False)
    ):
        try:
            sent = transport.socket.send(data)
        except OSError:
            # EAGAIN, or an error that Twisted's write path will meet and
            # report in its usual way.
            sent = 0
        if sent >= len(data):
            return
        if sent:
            data = data[sent:]
    transport.write(data)


_lastInterfaceByType: dict[type, Any] = {}


def _lastInterfaceOf(transport: object) -> Any:
    """
    What L{TLSMemoryBIOProtocol.makeConnection} ends up declaring that the
    TLS protocol directly provides: it calls C{directlyProvides} once per
    interface of the transport, each call replacing the previous one, so
    the last interface remains.  Worked out once per transport class (25
    microseconds per connection otherwise).
    """
    if "__provides__" in getattr(transport, "__dict__", {}):
        interfaces = list(providedBy(transport))
        return interfaces[-1] if interfaces else None
    kind = type(transport)
    try:
        return _lastInterfaceByType[kind]
    except KeyError:
        interfaces = list(providedBy(transport))
        last = _lastInterfaceByType[kind] = interfaces[-1] if interfaces else None
        return last


@implementer(IHalfCloseableProtocol, IPushProducer)
class HalfCloseTLSProtocol(TLSMemoryBIOProtocol):
    """
    A L{TLSMemoryBIOProtocol} that supports half-close on TLS 1.3.

    It is also an L{IHalfCloseableProtocol} towards the TCP transport below
    it, so that a peer's TCP FIN after its close_notify does not end the
    direction we are still writing in.

    @ivar _peerClosedWrite: The peer's close_notify arrived on TLS 1.3 and the
        wrapped protocol was told with C{readConnectionLost()}; nothing more
        is read.
    @ivar _writeClosed: C{loseWriteConnection()} was called: writes are
        dropped from then on.
    @ivar _closeNotifyPending: C{loseWriteConnection()} was called while the
        handshake was still going or cleartext was buffered; close_notify is
        sent once that has been dealt with.
    @ivar _handshakeFailureReported: L{handshakeFailed} has been called.
    @ivar receivedAny: Has the peer sent a byte yet?  A connection that ends
        without one was a TCP port probe (a load balancer's or a monitor's
        health check), not a failed handshake (L{mtlsproxy.relay}'s
        C{no_data}).
    """

    factory: HalfCloseTLSFactory
    transport: Any

    log = Logger()

    _peerClosedWrite = False
    _writeClosed = False
    _closeNotifyPending = False
    _handshakeFailureReported = False
    receivedAny = False

    def makeConnection(self, transport: Any) -> None:
        """
        What L{TLSMemoryBIOProtocol.makeConnection} does (create the OpenSSL
        connection, declare the transport's interface, connect the wrapped
        protocol, start the handshake), with the interface declaration
        worked out once per transport class.
        """
        self._tlsConnection = self.factory._creatorCallable(self)
        self._appSendBuffer = []
        interface = _lastInterfaceOf(transport)
        if interface is not None:
            directlyProvides(self, interface)
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)
        if self._connectWrapped:
            ProtocolWrapper.makeConnection(self, transport)
        self._checkHandshakeStatus()

    # -- half-close, reading side ------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        """
        Deliver TLS bytes from the TCP transport, unless the peer already sent
        close_notify: a peer may not send anything after it.
        """
        if self._peerClosedWrite:
            return
        handshaking = not self._handshakeDone
        if handshaking:
            self.receivedAny = True
        super().dataReceived(data)
        if handshaking and self._handshakeDone:
            self._releaseBuffers()
        elif len(data) >= RELEASE_AFTER:
            self._releaseBuffersSoon()

    _releaseCall: Any = None

    def _releaseBuffersSoon(self) -> None:
        """
        Release the BIOs' memory in L{RELEASE_DELAY} seconds, unless that is
        already planned.
        """
        if self._releaseCall is None:
            clock = getattr(self.factory, "_clock", None)
            if clock is None:
                self._releaseBuffers()
            else:
                self._releaseCall = clock.callLater(RELEASE_DELAY, self._releaseBuffers)

    def _releaseBuffers(self) -> None:
        """
        Give the memory BIOs' buffers back (L{_BatchIO.releaseBuffers}).
        """
        self._releaseCall = None
        if self._tlsConnection is not None and not self._lostTLSConnection:
            _batchIO.releaseBuffers(self._tlsConnection)

    def _flushReceiveBIO(self) -> None:
        """
        Deliver decrypted application data, as L{TLSMemoryBIOProtocol} does,
        except that the peer's close_notify may end only the reading side
        (see L{_peerSentCloseNotify}), and that every record available is
        delivered in one C{dataReceived} (up to L{RECORD_BATCH_SIZE} bytes).
        """
        while not self._lostTLSConnection and not self._peerClosedWrite:
            data, problem = _batchIO.readRecords(self._tlsConnection)
            if data and not self._aborted:
                ProtocolWrapper.dataReceived(self, data)
                if self._lostTLSConnection:
                    break
            if problem is None:
                # The batch was full: there may be more.
                continue
            if isinstance(problem, WantReadError):
                break
            if isinstance(problem, ZeroReturnError):
                if self._peerSentCloseNotify():
                    break
                # Twisted's behaviour: answer with our close_notify and close.
                self._shutdownTLS()
                self._tlsShutdownFinished(None)
            else:
                self._tlsShutdownFinished(Failure(problem))
        self._flushSendBIO()

    def _flushSendBIO(self) -> None:
        """
        Write everything OpenSSL has encrypted to the TCP transport, in one
        call (L{TLSMemoryBIOProtocol} takes at most 32 KiB per call).
        """
        chunks = _batchIO.readSent(self._tlsConnection)
        if len(chunks) == 1:
            writeNow(self.transport, chunks[0])
        elif chunks:
            writeNow(self.transport, b"".join(chunks))

    def _write(self, data: bytes) -> None:  # type: ignore[override]
        """
        Encrypt C{data} and send it, as L{TLSMemoryBIOProtocol} does, but
        with one write to the TCP transport for all of it rather than one
        per 16 KiB record.
        """
        if self._lostTLSConnection or not data:
            return
        # pyOpenSSL turns on SSL_MODE_ENABLE_PARTIAL_WRITE: SSL_write returns
        # after one record (16 KiB), so go on until OpenSSL took everything.
        view = memoryview(data)
        try:
            while view:
                view = view[self._tlsConnection.send(view) :]
        except WantReadError:
            # The handshake is not finished: nothing more was written; retried
            # with the same bytes by _unbufferPendingWrites.
            self._bufferedWrite(bytes(view))
            return
        except Error:
            self._tlsShutdownFinished(Failure())
            return
        self._flushSendBIO()
        if len(data) >= RELEASE_AFTER:
            self._releaseBuffersSoon()

    def _peerSentCloseNotify(self) -> bool:
        """
        The peer's close_notify has arrived: decide whether it ends only the
        reading side.

        @return: C{True} if the wrapped protocol was told with
            C{readConnectionLost()} and the connection stays open for writing;
            C{False} if the whole connection should close, because the version
            is not TLS 1.3, the wrapped protocol cannot be half-closed, or we
            already sent our own close_notify (then both directions are done).
        """
        halfCloseable = IHalfCloseableProtocol.providedBy(self.wrappedProtocol)
        if (
            not halfCloseable
            or self._closeNotifySent()
            or self._tlsConnection.get_protocol_version_name() != TLS13
        ):
            return False
        self._peerClosedWrite = True
        self.wrappedProtocol.readConnectionLost()  # type: ignore[attr-defined]
        return True

    def readConnectionLost(self) -> None:
        """
        The TCP transport below saw the peer's FIN.

        After the peer's close_notify that changes nothing: we may still be
        writing.  Otherwise the TLS stream was cut short (or the handshake
        never finished): close, and the wrapped protocol's C{connectionLost}
        tells it the connection was lost, as with Twisted's TLS.
        """
        if self._peerClosedWrite or self._lostTLSConnection:
            return
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        """
        The TCP transport below closed its writing side.  We never ask it to,
        so there is nothing to do.
        """

    # -- half-close, writing side ------------------------------------------

    def write(self, data: bytes) -> None:
        """
        Encrypt and send C{data}, unless C{loseWriteConnection()} was called:
        then it is dropped, as TCP does.
        """
        if self._writeClosed:
            return
        super().write(data)

    def loseWriteConnection(self) -> None:
        """
        Close the writing direction: send close_notify after any data still
        buffered, and go on reading until the peer's close_notify.  Once both
        alerts have gone, the TCP connection is closed.
        """
        if self._writeClosed or self.disconnecting or not self.connected:
            return
        self._writeClosed = True
        self._closeNotifyPending = True
        self._sendPendingCloseNotify()

    def _sendPendingCloseNotify(self) -> None:
        """
        Send the close_notify asked for by C{loseWriteConnection()} if the
        handshake is done and no cleartext is waiting to be encrypted.
        """
        if (
            not self._closeNotifyPending
            or not self._handshakeDone
            or self._appSendBuffer
            or self._lostTLSConnection
        ):
            return
        self._closeNotifyPending = False
        if self.disconnecting:
            # loseConnection() came in the meantime and does the rest.
            return
        try:
            bothClosed = self._tlsConnection.shutdown()
        except Error:
            bothClosed = False
        self._flushSendBIO()
        if bothClosed:
            # The peer closed first: both directions are finished now.
            self.disconnecting = True
            self.transport.loseConnection()

    def _closeNotifySent(self) -> bool:
        """
        Has our close_notify been sent, by C{loseWriteConnection()} or
        C{loseConnection()}?
        """
        return bool(self._tlsConnection.get_shutdown() & SENT_SHUTDOWN)

    def _checkHandshakeStatus(self) -> None:
        """
        Drive the handshake, and once it is done send a close_notify that was
        asked for during it.
        """
        super()._checkHandshakeStatus()
        self._sendPendingCloseNotify()

    def _unbufferPendingWrites(self) -> None:
        """
        Encrypt cleartext written during the handshake, then send a
        close_notify that was waiting for it.
        """
        super()._unbufferPendingWrites()
        self._sendPendingCloseNotify()

    # -- full close and producer -------------------------------------------

    def loseConnection(self) -> None:
        """
        Close both directions with close_notify, as L{TLSMemoryBIOProtocol}
        does; since that waits for the peer's close_notify, first make sure
        the TCP transport is reading (a relay may have paused it).
        """
        if self.disconnecting or not self.connected:
            return
        if self._handshakeDone and not self._lostTLSConnection:
            self.transport.resumeProducing()
        super().loseConnection()

    def pauseProducing(self) -> None:
        """
        Stop reading from the peer (L{IPushProducer}).
        """
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        """
        Resume reading from the peer (L{IPushProducer}).
        """
        self.transport.resumeProducing()

    def stopProducing(self) -> None:
        """
        The consumer we were producing for is gone (L{IPushProducer}): close
        cleanly, with close_notify, rather than dropping the TCP connection
        underneath as the TCP transport's own C{stopProducing} would.
        """
        self.loseConnection()

    # -- handshake failure --------------------------------------------------

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        """
        The TCP connection is gone.  If the handshake never completed, report
        that through L{handshakeFailed} (once) before the wrapped protocol
        hears about it.
        """
        if not self._lostTLSConnection:
            # What TLSMemoryBIOProtocol.connectionLost does first; done here so
            # that a TLS error it turns up is the reason we report.
            self._tlsConnection.bio_shutdown()
            self._flushReceiveBIO()
            self._lostTLSConnection = True
        if self._releaseCall is not None:
            self._releaseCall.cancel()
            self._releaseCall = None
        if not self._handshakeDone and not self._handshakeFailureReported:
            self._handshakeFailureReported = True
            self.handshakeFailed(self._reason or reason)
        super().connectionLost(reason)

    def handshakeFailed(self, reason: Failure) -> None:
        """
        The connection ended before the TLS handshake completed: the peer's
        certificate was rejected, the peer rejected ours, no common protocol
        version or cipher, bytes that are not TLS, or the peer just went away.

        Called once, before the wrapped protocol's C{connectionLost}, while
        C{getHandle()} still works.  Calls the factory's C{handshakeFailed}
        callback, if any; override in a subclass for other behaviour.

        @param reason: Why: usually an L{OpenSSL.SSL.Error}, or a
            L{twisted.internet.error.ConnectionLost} /
            L{twisted.internet.error.ConnectionDone}.
        """
        handler = self.factory.handshakeFailureHandler
        if handler is None:
            return
        try:
            handler(self, reason)
        except Exception:
            self.log.failure("Handshake failure handler {handler!r} raised", handler=handler)


class HalfCloseTLSFactory(TLSMemoryBIOFactory):
    """
    Wraps a factory's protocols in L{HalfCloseTLSProtocol}.

    @ivar handshakeFailureHandler: Called with the protocol and the reason
        when a connection ends before its handshake completed, or L{None}.
    """

    noisy = False

    protocol = HalfCloseTLSProtocol

    def __init__(
        self,
        contextFactory: object,
        isClient: bool,
        wrappedFactory: IProtocolFactory,
        clock: Optional[IReactorTime] = None,
        handshakeFailed: Optional[HandshakeFailureHandler] = None,
    ) -> None:
        """
        @param contextFactory: An L{IOpenSSLServerConnectionCreator} (or
            client connection creator when C{isClient}); see
            L{TLSMemoryBIOFactory}.
        @param isClient: C{True} for connections we initiate.
        @param wrappedFactory: Builds the application protocols.
        @param clock: Passed to L{TLSMemoryBIOFactory}; our protocol does not
            use it (it does not aggregate small writes the way Twisted's
            default L{BufferingTLSTransport} does: a relay writes what it
            read, in large chunks, and flow control stays exact).
        @param handshakeFailed: See L{HalfCloseTLSProtocol.handshakeFailed}.
        """
        super().__init__(contextFactory, isClient, wrappedFactory, clock)  # type: ignore[arg-type]
        self.handshakeFailureHandler = handshakeFailed
