"""The object store (issue 10): one S3 bucket and key prefix, the tier behind the local cache dir.

Key layout, under ``storage.s3.prefix`` (say ``dioproxy/``; keys given to and returned by :class:`ObjectStore`
are relative to it)::

    <prefix>blobs/sha256/<ab>/<hex>        a blob whose sha256 is <hex>; <ab> is its first two hex digits
    <prefix>manifests/sha256/<ab>/<hex>    a manifest, by the sha256 of its bytes

:func:`blob_key` and :func:`manifest_key` make those keys from a digest. The content of a key never changes (it is
named by its hash), so writes are "create if absent" and nothing is ever overwritten.

How it talks to the store, so that the reactor never waits on it:

- control calls (list, head, delete, multipart create/complete/abort, the start check) go through boto3, which
  blocks, in a small thread pool of its own: a slow store must not fill the pool Twisted resolves names in, and
  many concurrent boto3 calls in one pool already stall the reactor through the GIL. Every call has a deadline
  (:class:`~dioproxy.pools.BlockingPool`): its Deferred fails even if botocore hangs in its socket.
- presigning runs on the reactor: it is arithmetic on the credentials, no I/O (about 150 us).
- data goes through treq against presigned URLs, unbuffered, so a body streams through the reactor and is never
  held whole in memory; reads of a body stop after ``timeout`` seconds without a byte
  (:class:`~dioproxy.upstream.IdleDeadline`), and so do uploads that get nothing out for that long.

Conditional commit: PutObject and CompleteMultipartUpload are sent with ``If-None-Match: *``, so an object that
is there is never replaced, and :meth:`ObjectStore.put_file` says whether we wrote it or found it. Measured on
SeaweedFS 4.48: PutObject honours it atomically (of racing writers exactly one gets 200, the others 412).
CompleteMultipartUpload honours it against an object that was there before, but NOT between completes racing
each other: both usually succeed, and one of the two uploads stands, whole (never a mix). So on SeaweedFS
two replicas finishing a large upload of one key in the same few milliseconds may both report "wrote"; since keys
are content hashes their bytes are the same, and every read is verified against the digest anyway. We know of no
better commit the S3 API offers (CopyObject has no If-None-Match). AWS S3 documents one winner on both calls.
"""

from __future__ import annotations

import http.client
import io
import math
import os
import re
import socket
import time
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import urlsplit

import boto3
import botocore.exceptions
from botocore.config import Config as BotoConfig
from treq.client import HTTPClient
from twisted.internet import defer, error, interfaces
from twisted.logger import Logger
from twisted.python.components import proxyForInterface
from twisted.python.failure import Failure
from twisted.web import client as webclient
from twisted.web.iweb import IBodyProducer, IResponse
from zope.interface import implementer

from dioproxy.config import ConfigError, S3Storage
from dioproxy.pools import BlockingPool, PoolTimeout
from dioproxy.upstream import IdleDeadline, discard, read_limited

log = Logger()

BLOBS = "blobs/sha256/"
MANIFESTS = "manifests/sha256/"
MIN_PART_SIZE = 5 * 2**20  # S3's smallest part (all but the last)
MAX_PARTS = 10_000  # S3's most parts in one upload
DEFAULT_PART_SIZE = 32 * 2**20
DATA_URL_TTL = 3600  # presigned URLs we use ourselves: long enough for one part or one read to start
_HEX = re.compile(r"[0-9a-f]{64}")
READERS = 4  # reads into the hot tier at once
READ_CHUNK = 2**20


def _digest_key(kind: str, digest: str) -> str:
    algorithm, _, hexdigest = digest.partition(":")
    if algorithm != "sha256" or not _HEX.fullmatch(hexdigest):
        raise ValueError(f"not a sha256 digest: {digest[:80]!r}")
    return f"{kind}{hexdigest[:2]}/{hexdigest}"


def blob_key(digest: str) -> str:
    """``sha256:<hex>`` -> ``blobs/sha256/<ab>/<hex>`` (relative to the prefix)."""
    return _digest_key(BLOBS, digest)


def manifest_key(digest: str) -> str:
    """``sha256:<hex>`` -> ``manifests/sha256/<ab>/<hex>`` (relative to the prefix)."""
    return _digest_key(MANIFESTS, digest)


class ObjectStoreError(Exception):
    """The store refused or failed a call; ``status`` and ``code`` are its HTTP status and S3 error code if any."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class ObjectNotFound(ObjectStoreError):
    """The key is not in the bucket."""


class ObjectStoreTimeout(ObjectStoreError):
    """The store did not answer (or took no bytes) within the deadline."""


class StoreConfigError(ConfigError):
    """``check`` found the store unusable with this configuration; the message names the key to fix."""

    @property
    def key(self) -> str:
        """The configuration key the message names (``storage.s3.endpoint``: the store did not answer at all)."""
        return str(self).split(":", 1)[0]


@dataclass(frozen=True)
class ObjectInfo:
    key: str  # relative to the prefix
    size: int
    etag: str
    modified: float  # seconds since the epoch


class ObjectStore:
    """One bucket and prefix of an S3-compatible store (``storage.s3``), boto3 kept behind it.

    ``timeout`` bounds every wait on the store: a control call's answer, a response's headers, a pause in a body
    being read or in an upload. ``part_size`` is where uploads go multipart (and each part's size);
    ``part_concurrency`` parts go at once. ``threads`` is the size of the control-call pool.
    """

    def __init__(
        self,
        reactor: Any,
        settings: S3Storage,
        *,
        timeout: float = 30.0,
        connect_timeout: float = 10.0,
        part_size: int = DEFAULT_PART_SIZE,
        part_concurrency: int = 2,
        threads: int = 4,
        page_size: int = 1000,
    ) -> None:
        if part_size < MIN_PART_SIZE:
            raise ValueError(f"part_size must be at least {MIN_PART_SIZE} bytes (S3's smallest part)")
        self.reactor = reactor
        self.settings = settings
        self.bucket = settings.bucket
        self.prefix = settings.prefix
        self.timeout = timeout
        self.part_size = part_size
        self.part_concurrency = part_concurrency
        self.page_size = page_size
        self.where = where(settings)
        self.label = f"s3://{self.bucket}/{self.prefix}"  # in logs and errors; never a presigned URL
        # Making the client reads botocore's service model from disk (tens of ms): once, at start.
        self.client = boto_client(settings, timeout=timeout, connect_timeout=connect_timeout, connections=threads)
        self.pool = BlockingPool(reactor, "s3", threads, timeout=timeout)
        #: Reads into the hot tier (:meth:`read_into`): each bounded by its own deadline, passed per call.
        self.readers = BlockingPool(reactor, "s3-read", READERS, timeout=timeout)
        self._connections = webclient.HTTPConnectionPool(reactor, persistent=True)
        self._connections.maxPersistentPerHost = part_concurrency + 4
        self.http = HTTPClient(webclient.Agent(reactor, connectTimeout=connect_timeout, pool=self._connections))

    # -- start and stop

    @defer.inlineCallbacks
    def check(self) -> Any:
        """At start: the bucket answers a list with our credentials, and a presigned URL is accepted.

        Fails with :class:`StoreConfigError` naming the key to fix (``storage.s3.secret_key: ...``).
        """
        try:
            yield self._call("list_objects_v2", Prefix=self.prefix, MaxKeys=1)
        except ObjectStoreError as e:
            raise self._config_error(e) from None
        # The data path: a presigned HEAD through treq, as every read and upload will go (404 is fine).
        try:
            response = yield self._send(b"HEAD", self._presign("head_object", "check/presigned"), {})
            yield discard(response)
        except ObjectStoreError as e:
            raise self._config_error(e) from None
        if response.code not in (200, 404):
            raise StoreConfigError(
                f"storage.s3.region: the store answered {response.code} to a presigned request "
                f"(region {self.settings.region!r}; endpoint {self.where})"
            )

    def _config_error(self, e: ObjectStoreError) -> StoreConfigError:
        return config_error(e, self.settings, self.timeout)

    def stop(self) -> defer.Deferred:
        """Close idle connections and let the control threads finish (at shutdown; a reader stops at its next
        chunk once its ``stopped()`` says so)."""
        self.pool.stop()
        self.readers.stop()
        return self._connections.closeCachedConnections()

    # -- keys and presigning

    def _presign(self, operation: str, key: str, ttl: float = DATA_URL_TTL, **params: Any) -> str:
        return self.client.generate_presigned_url(
            operation,
            Params={"Bucket": self.bucket, "Key": self.prefix + key, **params},
            ExpiresIn=max(1, math.ceil(ttl)),
        )

    def presign_get(self, key: str, ttl: float) -> str:
        """A URL anyone may GET ``key`` with for ``ttl`` seconds (``redirect: true`` sends clients there)."""
        return self._presign("get_object", key, ttl)

    # -- control calls

    def _call(self, operation: str, **params: Any) -> defer.Deferred:
        """``client.<operation>(Bucket=..., **params)`` in the pool, its errors as :class:`ObjectStoreError`."""
        call = getattr(self.client, operation)
        d = self.pool.run(call, Bucket=self.bucket, **params)
        return d.addErrback(self._control_failed, operation, params.get("Key"))

    def _control_failed(self, failure: Failure, operation: str, key: str | None) -> None:
        what = f"{self.label}: {operation}" + (f" {key}" if key else "")
        translated = control_error(failure.value, what, self.timeout)
        if translated is None:
            failure.raiseException()
        raise translated from None

    def head(self, key: str) -> defer.Deferred:
        """:class:`ObjectInfo` of ``key``, or None if the bucket does not have it."""

        def found(answer: dict) -> ObjectInfo:
            return ObjectInfo(key, answer["ContentLength"], answer["ETag"], answer["LastModified"].timestamp())

        def missing(failure: Failure) -> None:
            failure.trap(ObjectStoreError)
            if failure.value.status == 404:
                return None
            return failure

        return self._call("head_object", Key=self.prefix + key).addCallbacks(found, missing)

    def delete(self, key: str) -> defer.Deferred:
        """Remove ``key`` (no error if it was not there)."""
        return self._call("delete_object", Key=self.prefix + key).addCallback(lambda _: None)

    def list_page(self, prefix: str = "", token: str | None = None) -> defer.Deferred:
        """One page of the keys under ``prefix``: ``([ObjectInfo], token of the next page or None)``."""
        params: dict[str, Any] = {"Prefix": self.prefix + prefix, "MaxKeys": self.page_size}
        if token:
            params["ContinuationToken"] = token

        def page(answer: dict) -> tuple[list[ObjectInfo], str | None]:
            cut = len(self.prefix)
            infos = [
                ObjectInfo(o["Key"][cut:], o["Size"], o.get("ETag", ""), o["LastModified"].timestamp())
                for o in answer.get("Contents", ())
            ]
            more = answer.get("NextContinuationToken") if answer.get("IsTruncated") else None
            return infos, more

        return self._call("list_objects_v2", **params).addCallback(page)

    @defer.inlineCallbacks
    def walk(self, prefix: str, visit: Callable[[list[ObjectInfo]], Any]) -> Any:
        """Call ``visit(page)`` for every page under ``prefix``, waiting for it if it returns a Deferred.

        One page in memory at a time, however large the bucket. Fires with the number of keys seen.
        """
        seen, token = 0, None
        while True:
            infos, token = yield self.list_page(prefix, token)
            seen += len(infos)
            yield visit(infos)
            if token is None:
                return seen

    # -- small objects (manifests, tag entries, private records)

    @defer.inlineCallbacks
    def get_bytes(self, key: str, limit: int) -> Any:
        """The whole of a small object, or None if the bucket does not have it; ValueError past ``limit`` bytes."""
        try:
            response = yield self.get(key)
        except ObjectNotFound:
            return None
        return (yield read_limited(response, limit))

    @defer.inlineCallbacks
    def put_bytes(self, key: str, data: bytes, replace: bool = False) -> Any:
        """Write a small object in one PUT: True if written; False if it was there and ``replace`` is off (the
        commit then carries ``If-None-Match: *``, as for blobs)."""
        headers = {"Content-Type": "application/octet-stream"}
        if not replace:
            headers["If-None-Match"] = "*"
        producer = webclient.FileBodyProducer(io.BytesIO(data))
        response = yield self._send(b"PUT", self._presign("put_object", key), headers, producer)
        if response.code in (200, 412):
            yield discard(response)
            return response.code == 200
        raise (yield self._error(response, f"PUT {key}"))

    # -- data

    def _send(self, method: bytes, url: str, headers: dict[str, str], body: IBodyProducer | None = None) -> Any:
        """One treq request, cancelled when neither body bytes went out nor an answer came for ``timeout``.

        The response's body is read under an :class:`IdleDeadline` too, whoever reads it.
        """
        watch = _Watch(self.reactor, self.timeout)
        if body is not None:
            body = _WatchedBody(body, watch)
        d = self.http.request(method.decode(), url, headers=headers, data=body, unbuffered=True)
        watch.start(d)

        def failed(failure: Failure) -> None:
            path = url.split("?", 1)[0]
            if watch.expired:
                raise ObjectStoreTimeout(f"{self.label}: {method.decode()} {path}: nothing for {self.timeout:g} s")
            e = failure.value
            if isinstance(e, (error.ConnectError, error.DNSLookupError)):
                raise ObjectStoreError(f"{self.label}: cannot connect for {path}: {e}", code="Unreachable")
            if isinstance(e, (webclient.ResponseNeverReceived, webclient.RequestTransmissionFailed)):
                raise ObjectStoreError(f"{self.label}: {method.decode()} {path}: connection failed ({e})")
            return failure

        def answered(response: IResponse) -> IResponse:
            return _IdleResponse(response, self.reactor, self.timeout, self.label, url.split("?", 1)[0])

        return d.addBoth(watch.done).addCallbacks(answered, failed)

    @defer.inlineCallbacks
    def _error(self, response: IResponse, what: str) -> Any:
        """An :class:`ObjectStoreError` from a non-2xx answer, with the S3 error code from its (small) body."""
        try:
            body = yield read_limited(response, 64 * 1024)
        except Exception:
            body = b""
        match = re.search(rb"<Code>([^<]{1,100})</Code>", body)
        code = match.group(1).decode(errors="replace") if match else None
        cls = ObjectNotFound if response.code == 404 else ObjectStoreError
        return cls(f"{self.label}: {what}: {response.code} {code or ''}".rstrip(), response.code, code)

    @defer.inlineCallbacks
    def get(self, key: str, start: int = 0, end: int | None = None) -> Any:
        """The unread response (200, or 206 for a range) for bytes ``start``..``end`` (inclusive) of ``key``.

        The caller delivers its body into a protocol; that read fails (an ``UpstreamError`` in
        ``connectionLost``) after ``timeout`` seconds without a byte. A missing key is :class:`ObjectNotFound`.
        """
        headers = {}
        if start or end is not None:
            headers["Range"] = f"bytes={start}-{'' if end is None else end}"
        url = self._presign("get_object", key)
        response = yield self._send(b"GET", url, headers)
        if response.code not in (200, 206):
            raise (yield self._error(response, f"GET {key}"))
        return response

    def read_into(
        self, key: str, start: int, sink: Callable[[memoryview], None], stopped: Callable[[], bool], deadline: float
    ) -> defer.Deferred:
        """Read ``key`` from ``start`` to its end into ``sink(chunk)``, in a thread: a fill from the bucket never
        crosses the reactor (receiving, hashing and writing release the GIL, so it runs on a core of its own, at
        1 MiB a chunk instead of Twisted's 64 KiB). ``sink`` runs in that thread and may raise to stop the read.

        Every wait on the store is bounded by ``timeout`` (the socket's), the whole read by ``deadline`` seconds,
        and ``stopped()`` (asked between chunks) ends it early. Fires with the bytes read; fails with
        :class:`ObjectNotFound`, :class:`ObjectStoreTimeout` or :class:`ObjectStoreError` (a body cut short too).
        """
        url = self._presign("get_object", key)
        return self.readers.run(
            _read_into,
            url,
            start,
            sink,
            stopped,
            self.timeout,
            deadline,
            self.label,
            key,
            timeout=deadline + 2 * self.timeout,
        )

    @defer.inlineCallbacks
    def put_file(self, path: str, key: str) -> Any:
        """Upload the local file ``path`` as ``key`` unless the bucket has it: True if we wrote it, False if not.

        One PUT up to ``part_size``, multipart past it (a failed multipart upload is aborted). Either way the
        commit carries ``If-None-Match: *``, so an existing object is never overwritten; of racing writers exactly
        one gets True (but see the module docstring: racing multipart completes on SeaweedFS). The file is read
        64 kB at a time as the store takes it.
        """
        size = os.path.getsize(path)
        if (yield self.head(key)) is not None:
            return False
        if size <= self.part_size:
            return (yield self._put_single(path, key, size))
        return (yield self._put_multipart(path, key, size))

    @defer.inlineCallbacks
    def _put_single(self, path: str, key: str, size: int) -> Any:
        url = self._presign("put_object", key)
        headers = {"If-None-Match": "*", "Content-Type": "application/octet-stream"}
        response = yield self._send(b"PUT", url, headers, _file_slice(path, 0, size))
        if response.code == 200:
            yield discard(response)
            return True
        if response.code == 412:
            yield discard(response)
            return False
        e = yield self._error(response, f"PUT {key}")
        if response.code == 409:  # AWS: a conditional write raced another one; whoever won, look
            return not (yield self._exists_after_conflict(key, e))
        raise e

    @defer.inlineCallbacks
    def _exists_after_conflict(self, key: str, e: ObjectStoreError) -> Any:
        if (yield self.head(key)) is None:
            raise e  # nobody wrote it: the caller tries again later
        return True

    @defer.inlineCallbacks
    def _put_multipart(self, path: str, key: str, size: int) -> Any:
        part_size = max(self.part_size, -(-size // MAX_PARTS))
        created = yield self._call(
            "create_multipart_upload", Key=self.prefix + key, ContentType="application/octet-stream"
        )
        upload_id = created["UploadId"]
        try:
            parts = yield self._put_parts(path, key, upload_id, size, part_size)
            try:
                yield self._call(
                    "complete_multipart_upload",
                    Key=self.prefix + key,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": parts},
                    IfNoneMatch="*",
                )
            except ObjectStoreError as e:
                if e.status == 412:
                    yield self._abort(key, upload_id)
                    return False
                if e.status == 409:
                    yield self._abort(key, upload_id)
                    return not (yield self._exists_after_conflict(key, e))
                raise
            return True
        except Exception:
            # Our complete may have timed out after the store did it: then the abort fails (logged) and a retry
            # finds the object there. Otherwise the parts go, not left to bill.
            yield self._abort(key, upload_id)
            raise

    @defer.inlineCallbacks
    def _put_parts(self, path: str, key: str, upload_id: str, size: int, part_size: int) -> Any:
        """Every part, ``part_concurrency`` at a time; on a failure the others finish their part, then it raises."""
        numbers = iter(range(1, -(-size // part_size) + 1))
        etags: dict[int, str] = {}
        failures: list[Failure] = []

        @defer.inlineCallbacks
        def worker() -> Any:
            for number in numbers:
                if failures:
                    return
                offset = (number - 1) * part_size
                try:
                    etags[number] = yield self._put_part(
                        path, key, upload_id, number, offset, min(part_size, size - offset)
                    )
                except Exception:
                    failures.append(Failure())
                    return

        yield defer.DeferredList([worker() for _ in range(self.part_concurrency)])
        if failures:
            failures[0].raiseException()
        return [{"PartNumber": n, "ETag": etags[n]} for n in sorted(etags)]

    @defer.inlineCallbacks
    def _put_part(self, path: str, key: str, upload_id: str, number: int, offset: int, length: int) -> Any:
        url = self._presign("upload_part", key, UploadId=upload_id, PartNumber=number)
        response = yield self._send(b"PUT", url, {}, _file_slice(path, offset, length))
        if response.code != 200:
            raise (yield self._error(response, f"upload part {number} of {key}"))
        yield discard(response)
        etags = response.headers.getRawHeaders("etag")
        if not etags:
            raise ObjectStoreError(f"{self.label}: part {number} of {key}: answer without an ETag")
        return etags[0]

    @defer.inlineCallbacks
    def _abort(self, key: str, upload_id: str) -> Any:
        try:
            yield self._call("abort_multipart_upload", Key=self.prefix + key, UploadId=upload_id)
        except Exception as e:
            log.warn("object store: could not abort the upload of {key}: {e}", key=key, e=e)


def where(settings: S3Storage) -> str:
    """The store's endpoint as errors name it."""
    return settings.endpoint or f"AWS S3 ({settings.region})"


def boto_client(settings: S3Storage, *, timeout: float, connect_timeout: float, connections: int) -> Any:
    """The boto3 client of ``storage.s3``: the mirror's control calls and the blocking ``dioproxy`` admin command
    share it, so both sign, address and time out alike."""
    return boto3.session.Session().client(
        "s3",
        endpoint_url=settings.endpoint,
        region_name=settings.region,
        aws_access_key_id=settings.access_key,
        aws_secret_access_key=settings.secret_key,
        config=BotoConfig(
            signature_version="s3v4",  # with an endpoint_url botocore would presign SigV2
            # Stores of our own (SeaweedFS, MinIO) have no per-bucket DNS names; AWS does.
            s3={"addressing_style": "path" if settings.endpoint else "auto"},
            connect_timeout=connect_timeout,
            read_timeout=timeout,
            retries={"max_attempts": 2, "mode": "standard"},
            max_pool_connections=connections,
            # CRC trailers are an AWS extension other stores may not know; integrity is our sha256.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        ),
    )


def control_error(e: BaseException, what: str, timeout: float) -> ObjectStoreError | None:
    """A boto3 call's exception as an :class:`ObjectStoreError` saying ``what`` failed; None if it is not one of
    botocore's (a bug: let it through as it is)."""
    if isinstance(e, PoolTimeout):
        return ObjectStoreTimeout(f"{what}: no answer within {timeout:g} s")
    if isinstance(e, botocore.exceptions.ClientError):
        code = e.response.get("Error", {}).get("Code")
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        message = e.response.get("Error", {}).get("Message") or ""
        return ObjectStoreError(f"{what}: {status} {code} {message}".rstrip(), status, code)
    if isinstance(e, (botocore.exceptions.ReadTimeoutError, botocore.exceptions.ConnectTimeoutError)):
        return ObjectStoreTimeout(f"{what}: {e}")
    if isinstance(e, botocore.exceptions.EndpointConnectionError):
        return ObjectStoreError(f"{what}: {e}", code="Unreachable")
    if isinstance(e, botocore.exceptions.BotoCoreError):
        return ObjectStoreError(f"{what}: {e}")
    return None


def config_error(e: ObjectStoreError, settings: S3Storage, timeout: float) -> StoreConfigError:
    """What a failed first call says about the configuration: the message names the key to fix."""
    code, where_ = e.code or "", where(settings)
    if isinstance(e, ObjectStoreTimeout):
        return StoreConfigError(f"storage.s3.endpoint: no answer from {where_} within {timeout:g} s")
    if code == "Unreachable":
        return StoreConfigError(f"storage.s3.endpoint: cannot connect to {where_}: {e}")
    if code in ("SignatureDoesNotMatch", "403") or (e.status == 403 and not code):
        return StoreConfigError(
            f"storage.s3.secret_key: the object store refused our signature ({code or 403}); "
            "check storage.s3.secret_key and storage.s3.access_key"
        )
    if code in ("InvalidAccessKeyId", "InvalidClientTokenId"):
        return StoreConfigError("storage.s3.access_key: the object store does not know this access key")
    if code == "AccessDenied":
        return StoreConfigError(
            f"storage.s3.access_key: the object store refused access to bucket {settings.bucket!r} "
            "(AccessDenied): this key needs List, Read and Write on it"
        )
    if code in ("NoSuchBucket", "404") or e.status == 404:
        return StoreConfigError(f"storage.s3.bucket: no such bucket {settings.bucket!r} at {where_}")
    if code in ("AuthorizationHeaderMalformed", "PermanentRedirect", "301") or e.status == 301:
        return StoreConfigError(
            f"storage.s3.region: bucket {settings.bucket!r} is not in region {settings.region!r} ({code})"
        )
    return StoreConfigError(f"storage.s3: the object store at {where_} answered {e}")


class _Watch:
    """Cancels a request once ``timeout`` seconds pass with no body bytes sent and no answer yet."""

    def __init__(self, reactor: Any, timeout: float) -> None:
        self.reactor = reactor
        self.timeout = timeout
        self.expired = False
        self._d: defer.Deferred | None = None
        self._timer: Any = None

    def start(self, d: defer.Deferred) -> None:
        self._d = d
        self._timer = self.reactor.callLater(self.timeout, self._expire)

    def touch(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.reset(self.timeout)

    def _expire(self) -> None:
        self.expired = True
        self._d.cancel()

    def done(self, result: Any) -> Any:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        return result


class _Slice:
    """``length`` bytes of a file from ``offset``, as a file object FileBodyProducer can read (one part)."""

    def __init__(self, path: str, offset: int, length: int) -> None:
        self._file = open(path, "rb")  # noqa: SIM115 (FileBodyProducer closes it)
        self._file.seek(offset)
        self._left = length

    def read(self, n: int) -> bytes:
        data = self._file.read(min(n, self._left))
        self._left -= len(data)
        return data

    def close(self) -> None:
        self._file.close()


def _file_slice(path: str, offset: int, length: int) -> IBodyProducer:
    producer = webclient.FileBodyProducer(_Slice(path, offset, length))
    producer.length = length  # a Content-Length, not chunked: S3 wants one for presigned PUTs
    return producer


@implementer(IBodyProducer)
class _WatchedBody:
    """A body producer whose every write to the connection counts as progress for its :class:`_Watch`."""

    def __init__(self, inner: IBodyProducer, watch: _Watch) -> None:
        self._inner = inner
        self._watch = watch
        self.length = inner.length

    def startProducing(self, consumer: interfaces.IConsumer) -> defer.Deferred:
        return self._inner.startProducing(_TouchingConsumer(consumer, self._watch))

    def pauseProducing(self) -> None:
        self._inner.pauseProducing()

    def resumeProducing(self) -> None:
        self._inner.resumeProducing()

    def stopProducing(self) -> None:
        self._inner.stopProducing()


class _TouchingConsumer:
    def __init__(self, consumer: interfaces.IConsumer, watch: _Watch) -> None:
        self._consumer = consumer
        self._watch = watch

    def write(self, data: bytes) -> None:
        self._watch.touch()
        self._consumer.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._consumer, name)


class _IdleResponse(proxyForInterface(IResponse)):  # type: ignore[misc]
    """A store response whose body is read under an :class:`IdleDeadline` (a stalled store fails its reader)."""

    def __init__(self, original: IResponse, reactor: Any, timeout: float, label: str, where: str) -> None:
        super().__init__(original)
        self._deadline = (reactor, timeout, label, where)

    def deliverBody(self, protocol: Any) -> None:
        self.original.deliverBody(IdleDeadline(protocol, *self._deadline))


def _read_into(
    url: str,
    start: int,
    sink: Callable[[memoryview], None],
    stopped: Callable[[], bool],
    timeout: float,
    deadline: float,
    label: str,
    key: str,
) -> int:
    """:meth:`ObjectStore.read_into`'s blocking half (a thread of the ``s3-read`` pool)."""
    parts = urlsplit(url)
    connection_class = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    connection = connection_class(parts.hostname, parts.port, timeout=timeout)
    ends = time.monotonic() + deadline
    what = f"{label}: GET {key}"
    try:
        connection.request("GET", f"{parts.path}?{parts.query}", headers={"Range": f"bytes={start}-"} if start else {})
        response = connection.getresponse()
        if response.status not in (200, 206) or (start and response.status != 206):
            body = response.read(4096)
            match = re.search(rb"<Code>([^<]+)</Code>", body)
            code = match.group(1).decode(errors="replace") if match else None
            cls = ObjectNotFound if response.status == 404 else ObjectStoreError
            raise cls(f"{what}: {response.status} {code or ''}".rstrip(), response.status, code)
        buffer = memoryview(bytearray(READ_CHUNK))
        total = 0
        while not stopped():
            if time.monotonic() > ends:
                raise ObjectStoreTimeout(f"{what}: not done within {deadline:.0f} s")
            n = response.readinto(buffer)
            if not n:
                return total
            sink(buffer[:n])
            total += n
        raise ObjectStoreError(f"{what}: stopped")
    except socket.timeout:
        raise ObjectStoreTimeout(f"{what}: no bytes within {timeout:g} s") from None
    except (OSError, http.client.HTTPException) as e:
        raise ObjectStoreError(f"{what}: {e.__class__.__name__}: {e}") from None
    finally:
        connection.close()
