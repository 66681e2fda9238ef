#!/usr/bin/env python3
"""A Qdrant-compatible gRPC server for tests, built on Qdrant's own packages from PyPI.

The Rust tests (crate `qdrant-client`, gRPC) talk to this, as no Qdrant binary is available.
Wire side: the gRPC servicers and `GrpcToRest`/`RestToGrpc` converters of the `qdrant-client`
wheel turn requests into REST models, served by one of two engines:
  * `edge` (default when importable): `qdrant-edge-py`, Qdrant's real Rust engine, one
    on-disk shard per collection in a temp dir;
  * `local`: `qdrant-client`'s local mode, a pure-Python re-implementation of Qdrant.
Around either, the `Engine` base class does what a real server's collection layer does:
collections and configs, payload-index schema, operation ids, real Qdrant's scroll checks,
status codes and messages; one lock serialises engine access.

Usage: python3 testsupport/qdrant_server.py --host 127.0.0.1 --port 0 [--engine edge|local]
Prints `READY port=<port>` on stdout once serving; logs go to stderr; stops on SIGTERM/SIGINT.
"""
from __future__ import annotations

import argparse
import functools
import logging
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
import warnings
from concurrent import futures
from dataclasses import dataclass, field
from datetime import date
from importlib.metadata import version

import grpc
import numpy as np
from pydantic import BaseModel
from qdrant_client.conversions.conversion import GrpcToRest, RestToGrpc
from qdrant_client.grpc import collections_pb2 as C
from qdrant_client.grpc import collections_service_pb2_grpc as CS
from qdrant_client.grpc import points_pb2 as P
from qdrant_client.grpc import points_service_pb2_grpc as PS
from qdrant_client.grpc import qdrant_pb2 as Q
from qdrant_client.grpc import qdrant_pb2_grpc as QS
from qdrant_client.http import models as M

try:
    import qdrant_edge as E
except ImportError:  # local mode still works
    E = None

log = logging.getLogger("qdrant-test-server")

RANGE_TYPES = {M.PayloadSchemaType.INTEGER, M.PayloadSchemaType.FLOAT, M.PayloadSchemaType.DATETIME}
FIELD_TYPES = {getattr(P, f"FieldType{t.value.title()}"): t for t in M.PayloadSchemaType}  # gRPC -> REST


class ApiError(Exception):
    """An error with the gRPC status code and the message a real Qdrant would send."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


def bad_input(message: str) -> ApiError:
    return ApiError(grpc.StatusCode.INVALID_ARGUMENT, f"Wrong input: {message}")


def not_found(name: str) -> ApiError:
    return ApiError(grpc.StatusCode.NOT_FOUND, f"Not found: Collection `{name}` doesn't exist!")


def rpc(method):
    """Wrap a servicer method: map errors to gRPC statuses like Qdrant does."""

    @functools.wraps(method)
    def wrapper(self, request, context):
        t0 = time.perf_counter()
        try:
            response = method(self, request, context)
            if "time" in response.DESCRIPTOR.fields_by_name:
                response.time = time.perf_counter() - t0
            return response
        except ApiError as e:
            context.abort(e.code, e.message)
        except Exception as e:  # noqa: BLE001
            # bad input: local mode raises ValueError / TypeError, qdrant_edge a bare Exception
            if isinstance(e, (ValueError, TypeError)) or type(e) is Exception:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"Wrong input: {e}")
            log.exception("%s failed", method.__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"Service internal error: {e}")

    return wrapper


@dataclass
class Collection:
    handle: object  # the engine's own collection (edge shard / local-mode name)
    vectors: object  # REST VectorParams or {name: VectorParams}
    sparse: dict | None
    schema: dict = field(default_factory=dict)  # field -> (PayloadSchemaType, params)
    op_id: int = -1


class Engine:
    """Collection layer shared by both engines: REST models in and out, one lock.

    Subclasses provide `_create`, `_drop` and the per-collection operations `_upsert`,
    `_delete`, `_payload`, `_index`, `_unindex`, `_retrieve`, `_count`, `_scroll`, `_query`
    (each taking a `Collection` first).
    """

    def __init__(self):
        self.lock = threading.RLock()
        self.cols: dict[str, Collection] = {}

    def _col(self, name: str) -> Collection:
        if name not in self.cols:
            raise not_found(name)
        return self.cols[name]

    def names(self) -> list[str]:
        with self.lock:
            return list(self.cols)

    def exists(self, name: str) -> bool:
        with self.lock:
            return name in self.cols

    def create(self, name: str, vectors, sparse) -> None:
        with self.lock:
            if name in self.cols:
                raise bad_input(f"Collection `{name}` already exists!")
            self.cols[name] = Collection(self._create(name, vectors, sparse), vectors or {}, sparse)

    def drop(self, name: str) -> bool:
        with self.lock:
            col = self.cols.pop(name, None)
            if col is not None:
                self._drop(name, col)
            return col is not None

    def update(self, name: str, op: str, *args) -> M.UpdateResult:
        """Run a write `op` (`_upsert`, `_delete`, ...) on a collection; count an operation id."""
        with self.lock:
            col = self._col(name)
            getattr(self, f"_{op}")(col, *args)
            if op == "index":
                col.schema[args[0]] = args[1:]
            elif op == "unindex":
                col.schema.pop(args[0], None)
            col.op_id += 1
            return M.UpdateResult(operation_id=col.op_id, status=M.UpdateStatus.COMPLETED)

    def read(self, name: str, op: str, *args):
        """Run a read `op` (`_retrieve`, `_count`, `_query`) on a collection."""
        with self.lock:
            return getattr(self, f"_{op}")(self._col(name), *args)

    def info(self, name: str) -> M.CollectionInfo:
        with self.lock:
            col = self._col(name)
            schema = {
                key: M.PayloadIndexInfo(data_type=kind, params=params, points=self._count(col, M.Filter(
                    must_not=[M.IsEmptyCondition(is_empty=M.PayloadField(key=key))])))
                for key, (kind, params) in col.schema.items()
            }
            return M.CollectionInfo(
                status=M.CollectionStatus.GREEN, optimizer_status=M.OptimizersStatusOneOf.OK,
                points_count=self._count(col, None), indexed_vectors_count=0, segments_count=1,
                payload_schema=schema,
                config=M.CollectionConfig(
                    params=M.CollectionParams(vectors=col.vectors, sparse_vectors=col.sparse, shard_number=1,
                                              replication_factor=1, write_consistency_factor=1, on_disk_payload=True),
                    hnsw_config=M.HnswConfig(m=16, ef_construct=100, full_scan_threshold=10000),
                    optimizer_config=M.OptimizersConfig(deleted_threshold=0.2, vacuum_min_vector_number=1000,
                                                        default_segment_number=0, flush_interval_sec=5),
                    wal_config=M.WalConfig(wal_capacity_mb=32, wal_segments_ahead=0),
                ),
            )

    def scroll(self, name, flt, limit, offset, order_by, with_payload, with_vectors):
        """Scroll as real Qdrant does: by id with a next-page offset, or by a payload value that
        has a range index, from `start_from` inclusive, without a next-page offset."""
        with self.lock:
            col = self._col(name)
            if limit == 0:
                raise ApiError(grpc.StatusCode.INVALID_ARGUMENT, "Bad request: Limit cannot be 0")
            if order_by is None:
                return self._scroll(col, flt, limit, offset, None, with_payload, with_vectors)
            kind, params = col.schema.get(order_by.key, (None, None))
            if kind not in RANGE_TYPES or getattr(params, "range", None) is False:
                raise bad_input(
                    f"No range index for `order_by` key: `{order_by.key}`. Please create one to use `order_by`. "
                    "Check https://qdrant.tech/documentation/concepts/indexing/#payload-index "
                    "to see which payload schemas support Range conditions")
            if offset is not None:
                raise bad_input(
                    "Cannot use an `offset` when using `order_by`. The alternative for paging is to use "
                    "`order_by.start_from` and a filter to exclude the IDs that you've already seen for "
                    "the `order_by.start_from` value")
            return self._scroll(col, flt, limit, None, order_by, with_payload, with_vectors)[0], None

    def _index(self, col, key, kind, params):  # local mode filters without indexes
        pass

    def _unindex(self, col, key):
        pass

    def close(self) -> None:
        with self.lock:
            for name in list(self.cols):
                self.drop(name)


class LocalEngine(Engine):
    """qdrant-client local mode (pure Python)."""

    def __init__(self):
        super().__init__()
        from qdrant_client.local.qdrant_local import QdrantLocal

        self.db = QdrantLocal(":memory:")

    def _create(self, name, vectors, sparse):
        self.db.create_collection(name, vectors_config=vectors, sparse_vectors_config=sparse)
        return name

    def _drop(self, name, col):
        self.db.delete_collection(name)

    def _upsert(self, col, points):
        self.db.upsert(col.handle, points)

    def _delete(self, col, selector):
        self.db.delete(col.handle, selector)

    def _payload(self, col, mode, selector, value, key=None):
        getattr(self.db, f"{mode}_payload")(col.handle, value, selector, key=key)

    def _retrieve(self, col, ids, with_payload, with_vectors):
        return self.db.retrieve(col.handle, ids, with_payload=with_payload, with_vectors=with_vectors)

    def _count(self, col, flt):
        return self.db.count(col.handle, count_filter=flt).count

    def _scroll(self, col, flt, limit, offset, order_by, with_payload, with_vectors):
        return self.db.scroll(col.handle, scroll_filter=flt, limit=limit, offset=offset, order_by=order_by,
                              with_payload=with_payload, with_vectors=with_vectors)

    def _query(self, col, q: M.QueryRequest):
        return self.db.query_points(
            col.handle, query=q.query, using=q.using, prefetch=q.prefetch, query_filter=q.filter,
            search_params=q.params, limit=q.limit or 10, offset=q.offset, with_payload=q.with_payload or False,
            with_vectors=q.with_vector or False, score_threshold=q.score_threshold,
        ).points


# -- REST models <-> qdrant_edge objects -------------------------------------------------------
EDGE_NAMES = {"Range": "RangeFloat", "DatetimeRange": "RangeDateTime"}


def to_edge(x):
    """A REST filter / condition / match / range / geo model -> the qdrant_edge object."""
    if isinstance(x, list):
        return [to_edge(v) for v in x]
    if isinstance(x, M.MatchValue) and isinstance(x.value, bool):  # edge 0.9 would read a bool as an int
        return E.MatchValue(np.bool_(x.value))
    if isinstance(x, date):
        return x.isoformat()
    if not isinstance(x, BaseModel):
        return x
    name = type(x).__name__
    if name in ("IsEmptyCondition", "IsNullCondition"):
        return getattr(E, name)((x.is_empty if name == "IsEmptyCondition" else x.is_null).key)
    if name == "HasIdCondition":
        return E.HasIdCondition(set(x.has_id))
    if name == "HasVectorCondition":
        return E.HasVectorCondition(x.has_vector)
    if name == "NestedCondition":
        return E.NestedCondition(x.nested.key, to_edge(x.nested.filter))
    if name == "GeoLineString":
        return to_edge(x.points)
    if name == "OrderBy":
        direction = E.Direction.Desc if x.direction == M.Direction.DESC else E.Direction.Asc
        return E.OrderBy(x.key, direction, to_edge(x.start_from))
    args = {k: to_edge(v) for k, v in x if v is not None}
    if name == "Filter":  # REST allows a single condition where edge wants a list
        args = {k: v if isinstance(v, list) or k == "min_should" else [v] for k, v in args.items()}
    return getattr(E, EDGE_NAMES.get(name, name))(**args)


def edge_payload_selector(wp):
    if isinstance(wp, (M.PayloadSelectorInclude, M.PayloadSelectorExclude)):
        return E.PayloadSelector.Include(wp.include) if isinstance(wp, M.PayloadSelectorInclude) \
            else E.PayloadSelector.Exclude(wp.exclude)
    return wp  # bool or list of keys


def edge_vector(v):
    if isinstance(v, dict):
        return {k: edge_vector(x) for k, x in v.items()}
    if isinstance(v, M.SparseVector):
        return E.SparseVector(v.indices, v.values)
    if isinstance(v, list):
        return v
    raise bad_input(f"unsupported vector input (no inference in this server): {type(v).__name__}")


def rest_vector(v):
    if isinstance(v, dict):
        return {k: rest_vector(x) for k, x in v.items()}
    if v is not None and not isinstance(v, list):  # an edge SparseVector
        return M.SparseVector(indices=list(v.indices), values=list(v.values))
    return v


def rest_id(pid):
    return str(pid) if isinstance(pid, uuid.UUID) else pid


class EdgeEngine(Engine):
    """qdrant-edge-py: Qdrant's own engine, one shard per collection under a temp dir."""

    def __init__(self, data_dir: str | None):
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="qdrant-edge-", dir=data_dir)
        self.paths: dict[str, str] = {}  # collection -> its shard's directory

    def _create(self, name, vectors, sparse):
        def params(p: M.VectorParams):
            if p.multivector_config is not None:
                raise bad_input("multivectors are not supported by this test server")
            return E.EdgeVectorParams(size=p.size, distance=getattr(E.Distance, p.distance.value))

        dense = {k: params(p) for k, p in vectors.items()} if isinstance(vectors, dict) else \
            params(vectors) if vectors else None
        config = E.EdgeConfig(vectors=dense, sparse_vectors={k: E.EdgeSparseVectorParams() for k in sparse or {}},
                              wal_enabled=False)
        self.paths[name] = tempfile.mkdtemp(dir=self.dir)
        return E.EdgeShard.create(self.paths[name], config)

    def _drop(self, name, col):
        col.handle.close()
        shutil.rmtree(self.paths.pop(name), ignore_errors=True)

    def _apply(self, col, op: str, selector, *args):
        """Run UpdateOperation `op` on the points a REST selector names (ids or a filter)."""
        if isinstance(selector, M.PointIdsList):
            col.handle.update(getattr(E.UpdateOperation, op)(selector.points, *args))
        else:
            col.handle.update(getattr(E.UpdateOperation, f"{op}_by_filter")(to_edge(selector.filter), *args))

    def _index(self, col, key, kind, params):
        col.handle.update(E.UpdateOperation.create_field_index(key, getattr(E.PayloadSchemaType, kind.value.title())))

    def _unindex(self, col, key):
        col.handle.update(E.UpdateOperation.delete_field_index(key))

    def _upsert(self, col, points):
        col.handle.update(E.UpdateOperation.upsert_points(
            [E.Point(p.id, edge_vector(p.vector), p.payload) for p in points]))

    def _delete(self, col, selector):
        self._apply(col, "delete_points", selector)

    def _payload(self, col, mode, selector, value, key=None):
        self._apply(col, f"{mode}_payload", selector, value, *([] if mode == "delete" else [key]))

    @staticmethod
    def _records(found) -> list[M.Record]:  # model_construct: the engine's output needs no validation
        return [M.Record.model_construct(id=rest_id(r.id), payload=r.payload, vector=rest_vector(r.vector),
                                         shard_key=None, order_value=r.order_value) for r in found]

    def _retrieve(self, col, ids, with_payload, with_vectors):
        return self._records(col.handle.retrieve(ids, edge_payload_selector(with_payload), with_vectors))

    def _count(self, col, flt):
        return col.handle.count(E.CountRequest(exact=True, filter=to_edge(flt)))

    def _scroll(self, col, flt, limit, offset, order_by, with_payload, with_vectors):
        found, next_id = col.handle.scroll(E.ScrollRequest(
            offset=offset, limit=limit, filter=to_edge(flt), order_by=to_edge(order_by),
            with_payload=edge_payload_selector(with_payload), with_vector=with_vectors))
        return self._records(found), rest_id(next_id)

    def _query(self, col, q: M.QueryRequest):
        query = q.query.nearest if isinstance(q.query, M.NearestQuery) else q.query
        if not isinstance(query, list) or q.prefetch:
            raise bad_input("this test server answers only plain nearest-vector queries")
        found = col.handle.query(E.QueryRequest(
            limit=q.limit or 10, offset=q.offset, query=E.Query.Nearest(query, q.using), filter=to_edge(q.filter),
            with_payload=edge_payload_selector(q.with_payload or False), with_vector=q.with_vector or False,
            score_threshold=q.score_threshold))
        return [M.ScoredPoint(id=rest_id(p.id), version=p.version, score=p.score, payload=p.payload,
                              vector=rest_vector(p.vector)) for p in found]

    def close(self):
        super().close()
        shutil.rmtree(self.dir, ignore_errors=True)


# -- gRPC <-> REST helpers ---------------------------------------------------------------------
def opt(msg, name, default=None):
    """Value of an optional proto field, or `default` when unset."""
    return getattr(msg, name) if msg.HasField(name) else default


def filter_of(msg):
    return GrpcToRest.convert_filter(msg.filter) if msg.HasField("filter") else None


def with_payload_of(msg, default: bool):
    return GrpcToRest.convert_with_payload_selector(msg.with_payload) if msg.HasField("with_payload") else default


def with_vectors_of(msg):
    return GrpcToRest.convert_with_vectors_selector(msg.with_vectors) if msg.HasField("with_vectors") else False


def selector_of(msg, name: str = "points_selector"):
    if not msg.HasField(name):
        raise bad_input("a points selector is required")
    return GrpcToRest.convert_points_selector(getattr(msg, name))


def record(r: M.Record) -> P.RetrievedPoint:
    if r.payload is None:  # the converter needs a dict
        r.payload = {}
    return RestToGrpc.convert_record(r)


class QdrantService(QS.QdrantServicer):
    @rpc
    def HealthCheck(self, request, context):
        return Q.HealthCheckReply(title="qdrant - vector search engine", version=version("qdrant-client"))


class CollectionsService(CS.CollectionsServicer):
    def __init__(self, engine: Engine):
        self.e = engine

    @rpc
    def List(self, request, context):
        return C.ListCollectionsResponse(collections=[C.CollectionDescription(name=n) for n in self.e.names()])

    @rpc
    def Get(self, request, context):
        info = self.e.info(request.collection_name)
        return C.GetCollectionInfoResponse(result=RestToGrpc.convert_collection_info(info))

    @rpc
    def CollectionExists(self, request, context):
        return C.CollectionExistsResponse(result=C.CollectionExists(exists=self.e.exists(request.collection_name)))

    @rpc
    def Create(self, request, context):
        vectors = (GrpcToRest.convert_vectors_config(request.vectors_config)
                   if request.HasField("vectors_config") else None)
        sparse = (GrpcToRest.convert_sparse_vector_config(request.sparse_vectors_config)
                  if request.HasField("sparse_vectors_config") else None)
        self.e.create(request.collection_name, vectors, sparse)
        return C.CollectionOperationResponse(result=True)

    @rpc
    def Delete(self, request, context):
        return C.CollectionOperationResponse(result=self.e.drop(request.collection_name))


class PointsService(PS.PointsServicer):
    def __init__(self, engine: Engine):
        self.e = engine

    def _update(self, request, op: str, *args) -> P.PointsOperationResponse:
        result = self.e.update(request.collection_name, op, *args)
        status = P.Completed if request.wait else P.Acknowledged
        return P.PointsOperationResponse(result=P.UpdateResult(operation_id=result.operation_id, status=status))

    @rpc
    def Upsert(self, request, context):
        return self._update(request, "upsert", [GrpcToRest.convert_point_struct(p) for p in request.points])

    @rpc
    def Delete(self, request, context):
        return self._update(request, "delete", selector_of(request, "points"))

    @rpc
    def SetPayload(self, request, context):
        payload = GrpcToRest.convert_payload(request.payload)
        return self._update(request, "payload", "set", selector_of(request), payload, opt(request, "key"))

    @rpc
    def OverwritePayload(self, request, context):
        payload = GrpcToRest.convert_payload(request.payload)
        return self._update(request, "payload", "overwrite", selector_of(request), payload, opt(request, "key"))

    @rpc
    def DeletePayload(self, request, context):
        return self._update(request, "payload", "delete", selector_of(request), list(request.keys))

    @rpc
    def CreateFieldIndex(self, request, context):
        if not request.HasField("field_type"):
            raise bad_input("field_type is required")
        params = (GrpcToRest.convert_payload_schema_params(request.field_index_params)
                  if request.HasField("field_index_params") else None)
        return self._update(request, "index", request.field_name, FIELD_TYPES[request.field_type], params)

    @rpc
    def DeleteFieldIndex(self, request, context):
        return self._update(request, "unindex", request.field_name)

    @rpc
    def Get(self, request, context):
        ids = [GrpcToRest.convert_point_id(i) for i in request.ids]
        found = self.e.read(request.collection_name, "retrieve", ids, with_payload_of(request, False),
                            with_vectors_of(request))
        return P.GetResponse(result=[record(r) for r in found])

    @rpc
    def Scroll(self, request, context):
        found, next_id = self.e.scroll(
            request.collection_name,
            filter_of(request),
            opt(request, "limit", 10),
            GrpcToRest.convert_point_id(request.offset) if request.HasField("offset") else None,
            GrpcToRest.convert_order_by(request.order_by) if request.HasField("order_by") else None,
            with_payload_of(request, True),
            with_vectors_of(request),
        )
        response = P.ScrollResponse(result=[record(r) for r in found])
        if next_id is not None:
            response.next_page_offset.CopyFrom(RestToGrpc.convert_extended_point_id(next_id))
        return response

    @rpc
    def Count(self, request, context):
        count = self.e.read(request.collection_name, "count", filter_of(request))
        return P.CountResponse(result=P.CountResult(count=count))

    @rpc
    def Search(self, request, context):
        query = M.QueryRequest(
            query=list(request.vector), using=opt(request, "vector_name"), filter=filter_of(request),
            limit=request.limit, offset=opt(request, "offset"), with_payload=with_payload_of(request, False),
            with_vector=with_vectors_of(request), score_threshold=opt(request, "score_threshold"),
        )
        points = self.e.read(request.collection_name, "query", query)
        return P.SearchResponse(result=[RestToGrpc.convert_scored_point(p) for p in points])

    @rpc
    def Query(self, request, context):
        points = self.e.read(request.collection_name, "query", GrpcToRest.convert_query_points(request))
        return P.QueryResponse(result=[RestToGrpc.convert_scored_point(p) for p in points])


def serve(args) -> None:
    limit = args.max_message_mb * 1024 * 1024
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=args.workers),
        options=[("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit),
                 ("grpc.so_reuseport", 0)],  # a busy port is an error, not a shared port
    )
    engine = EdgeEngine(args.data_dir) if args.engine == "edge" else LocalEngine()
    try:
        QS.add_QdrantServicer_to_server(QdrantService(), server)
        CS.add_CollectionsServicer_to_server(CollectionsService(engine), server)
        PS.add_PointsServicer_to_server(PointsService(engine), server)
        try:
            bound = server.add_insecure_port(f"{args.host}:{args.port}")
        except RuntimeError as e:
            raise SystemExit(f"cannot listen on {args.host}:{args.port}: {e}") from None
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        server.start()
        log.info("serving Qdrant gRPC on %s:%d (engine %s)", args.host, bound, args.engine)
        print(f"READY port={bound}", flush=True)
        stop.wait()
        log.info("stopping")
        server.stop(grace=1).wait()
    finally:
        engine.close()

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=6334, help="0 picks a free port")
    parser.add_argument("--engine", choices=("edge", "local"), default="edge" if E else "local")
    parser.add_argument("--data-dir", help="parent of the edge engine's temp dir (default: system temp)")
    parser.add_argument("--max-message-mb", type=int, default=64, help="gRPC max send/receive message size")
    parser.add_argument("--workers", type=int, default=8, help="gRPC worker threads")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args()
    logging.basicConfig(stream=sys.stderr, level=args.log_level,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    warnings.simplefilter("ignore")  # local mode warns about things a test server does not care about
    if args.engine == "edge" and E is None:
        raise SystemExit("--engine edge needs `pip install qdrant-edge-py`")
    serve(args)


if __name__ == "__main__":
    main()
