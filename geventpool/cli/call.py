"""``geventpool call IDL SERVICE METHOD [JSON_ARGS]``: one call through the real client.

The IDL file is loaded with thriftpy2; its service is the only one it declares, or the one
``--thrift-service`` names. ``SERVICE`` is the registry name: the call goes to one of its
live instances through a :class:`~geventpool.client.service.ServiceClient`, exactly as an
application's would (each instance's registry payload says its transport, protocol and
TLS); ``--instance HOST:PORT`` (repeatable) calls fixed instances instead, with
``--transport`` and ``--protocol`` (``SERVICE`` then only names it in messages).

``JSON_ARGS`` is a JSON array (the arguments in the IDL's order) or object (by name);
omitted, the method is called without arguments. Values follow the IDL's types (see
:mod:`geventpool.cli.values`): structs are objects of field names, lists and sets arrays,
maps objects or ``[[key, value], ...]`` arrays, **binary values base64 strings**, enums
names or numbers, doubles numbers or "NaN"/"Infinity"/"-Infinity".

What it prints and its exit code:

* the result, as one line of JSON on standard output (``null`` for a void or oneway
  method): 0;
* an exception the IDL declares: ``{"exception": TYPE, "field": NAME, "value": {...}}`` on
  standard output: 1;
* a failed call (no instance, a timeout, a broken connection, ZooKeeper unreachable, an
  exception the server did not declare): one line on standard error naming the error: 1;
* anything wrong with the command line itself, found before anything is sent (an IDL that
  cannot be read: missing, not a regular file, not UTF-8, not valid Thrift; an unknown
  service or method; JSON that does not parse or does not fit the IDL's types, nests more
  than 64 structs and containers deep, or holds a string that is not valid Unicode; a bad
  ``--instance``): usage and the reason on standard error: 2.

A server's error message is printed on one line, its control characters escaped.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import stat
import sys
from pathlib import Path
from typing import Any

import thriftpy2
from kazoo.client import KazooClient
from thriftpy2.parser.exc import ThriftGrammarError, ThriftLexerError, ThriftParserError
from thriftpy2.thrift import TApplicationException, TException

from geventpool.cli.common import (
    FAILED,
    OK,
    UsageError,
    add_registry_options,
    one_line,
    print_json,
    zookeeper,
)
from geventpool.cli.values import (
    MAX_DEPTH,
    JsonValueError,
    field_types,
    struct_to_json,
    to_json,
    to_thrift,
)
from geventpool.client.service import ServiceClient
from geventpool.discovery.instance import Instance
from geventpool.discovery.zk import service_path
from geventpool.errors import InvalidArgumentsError, InvalidInstanceError
from geventpool.wire.arguments import method_spec
from geventpool.wire.codecs import PROTOCOLS, TRANSPORTS

HELP = "make one call to a service and print the result as JSON"


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``call`` to the command line."""
    parser = commands.add_parser(
        "call",
        help=HELP,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("idl", metavar="IDL", help="the service's .thrift file")
    parser.add_argument("service", metavar="SERVICE", help="the service's name in the registry")
    parser.add_argument("method", metavar="METHOD", help="the IDL method to call")
    parser.add_argument(
        "arguments",
        metavar="JSON_ARGS",
        nargs="?",
        help="a JSON array (positional) or object (by name); default: no arguments",
    )
    parser.add_argument(
        "--thrift-service",
        metavar="NAME",
        help="the IDL's service to use (default: the only one it declares)",
    )
    parser.add_argument(
        "-I",
        "--include-dir",
        action="append",
        default=[],
        metavar="DIR",
        help="a folder where the IDL's includes are looked for (repeatable)",
    )
    static = parser.add_argument_group("fixed instances (instead of the registry)")
    static.add_argument(
        "--instance",
        action="append",
        metavar="HOST:PORT",
        help="call this instance rather than the registered ones (repeatable)",
    )
    static.add_argument(
        "--transport",
        choices=sorted(TRANSPORTS),
        help="the fixed instances' transport (default: buffered)",
    )
    static.add_argument(
        "--protocol",
        choices=sorted(PROTOCOLS),
        help="the fixed instances' protocol (default: binary)",
    )
    add_registry_options(parser)
    parser.set_defaults(run=run, command_parser=parser)


def run(args: argparse.Namespace) -> int:
    """Make the call and print its outcome (see the module for exit codes)."""
    service = pick_service(load_idl(args.idl, args.include_dir), args.thrift_service)
    methods = list(service.thrift_services)
    if args.method not in methods:
        raise UsageError(
            f"{service.__name__} has no method {args.method!r} (its methods: {', '.join(methods)})"
        )
    kwargs = arguments(service, args.method, args.arguments)
    try:
        method_spec(service, args.method).arguments((), kwargs)  # bound and typed, as sent
    except InvalidArgumentsError as error:
        raise UsageError(str(error)) from None
    if args.instance is not None:
        return make_call(service, args, kwargs, make_client(service, args))
    if args.transport or args.protocol:
        raise UsageError(
            "--transport and --protocol go with --instance: a registered instance's"
            " payload says its own"
        )
    service_path(args.service, args.root)  # a bad name: exit code 2 before connecting
    with zookeeper(args) as registry:
        return make_call(service, args, kwargs, make_client(service, args, registry))


def make_call(
    service: Any, args: argparse.Namespace, kwargs: dict[str, Any], client: ServiceClient
) -> int:
    """Make the call through ``client`` (stopped at the end) and print its outcome."""
    try:
        client.start(args.timeout)
        result = client.call(args.method, timeout=args.timeout, **kwargs)
    except TApplicationException as error:
        kind = _application_error_name(error)
        sys.stderr.write(f"geventpool call: TApplicationException ({kind}): {one_line(error)}\n")
        return FAILED
    except TException as error:
        declared = declared_exception(service, args.method, error)
        if declared is None:
            raise
        print_json(declared)
        return FAILED
    finally:
        client.stop()
    result_spec = getattr(service, f"{args.method}_result").thrift_spec
    print_json(to_json(result, *field_types(result_spec[0])) if 0 in result_spec else None)
    return OK


def load_idl(path: str, include_dirs: list[str]) -> Any:
    """The thriftpy2 module of the IDL at ``path`` (:class:`UsageError` if it cannot be
    read or parsed). Its module name is made of the file's name and full path: thriftpy2
    caches modules by name, and another file of the same name must not get this one's."""
    try:
        mode = os.stat(path).st_mode
    except OSError as error:
        raise UsageError(f"cannot read {path}: {error.strerror or error}") from None
    except ValueError as error:  # a NUL in the path
        raise UsageError(f"cannot read {path!r}: {error}") from None
    if not stat.S_ISREG(mode):  # a FIFO would block for ever, a device read without end
        raise UsageError(f"cannot read {path}: not a regular file")
    where = hashlib.sha1(str(Path(path).resolve()).encode(), usedforsecurity=False)
    stem = re.sub(r"\W", "_", Path(path).stem)
    name = f"{stem}_{where.hexdigest()[:8]}_thrift"
    try:
        return thriftpy2.load(
            path,
            module_name=name,
            include_dirs=[*include_dirs, str(Path(path).parent)],
        )
    except OSError as error:
        raise UsageError(f"cannot read {path}: {error.strerror or error}") from None
    except UnicodeDecodeError as error:
        raise UsageError(
            f"{path} (or a file it includes) is not UTF-8 text: byte {error.start} is"
            f" {error.object[error.start : error.start + 1]!r}"
        ) from None
    except RecursionError:
        raise UsageError(f"{path} is not a valid IDL: it nests too deeply") from None
    except (ThriftParserError, ThriftGrammarError, ThriftLexerError) as error:
        raise UsageError(f"{path} is not a valid IDL: {error}") from None


def pick_service(module: Any, name: str | None) -> Any:
    """The IDL's service called ``name``, or its only one (:class:`UsageError` otherwise,
    listing the services)."""
    services = {service.__name__: service for service in module.__thrift_meta__["services"]}
    if name is not None:
        if name not in services:
            raise UsageError(
                f"the IDL has no service {name!r} (its services: {', '.join(services) or 'none'})"
            )
        return services[name]
    if len(services) == 1:
        return next(iter(services.values()))
    if not services:
        raise UsageError("the IDL declares no service")
    raise UsageError(
        f"the IDL declares several services ({', '.join(services)}): choose one with"
        " --thrift-service"
    )


def arguments(service: Any, method: str, text: str | None) -> dict[str, Any]:
    """The call's keyword arguments from ``JSON_ARGS`` (:class:`UsageError` if it does not
    parse or does not fit the method's argument types)."""
    if text is None:
        return {}
    try:
        given = json.loads(text, parse_constant=_refuse_constant)
    except ValueError as error:
        raise UsageError(f"JSON_ARGS is not valid JSON: {error}") from None
    except RecursionError:  # nested deeper than json's own recursion allows
        raise UsageError(
            f"JSON_ARGS nests too deeply (structs and containers nest at most {MAX_DEPTH} deep)"
        ) from None
    spec = getattr(service, f"{method}_args").thrift_spec
    fields = [spec[key] for key in sorted(spec)]
    names = [field[1] for field in fields]
    if isinstance(given, list):
        if len(given) > len(names):
            raise UsageError(
                f"{method} takes {len(names)} arguments ({', '.join(names)}), {len(given)} given"
            )
        given = dict(zip(names, given, strict=False))
    elif not isinstance(given, dict):
        raise UsageError("JSON_ARGS must be an array (positional) or an object (by name)")
    by_name = {field[1]: field for field in fields}
    converted: dict[str, Any] = {}
    for name, value in given.items():
        if name not in by_name:
            raise UsageError(f"{method} has no argument {name!r} (its arguments: {names})")
        try:
            # depth 1: the arguments' own struct, as on the wire
            converted[name] = to_thrift(
                value, *field_types(by_name[name]), f"argument {name!r}", depth=1
            )
        except JsonValueError as error:
            raise UsageError(str(error)) from None
    return converted


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON (write the string {name!r} for a double)")


def make_client(
    service: Any, args: argparse.Namespace, registry: KazooClient | None = None
) -> ServiceClient:
    """The client: of the registry (through the connected ``registry``), or of the
    ``--instance`` list."""
    if args.instance is None:
        assert registry is not None
        return ServiceClient(
            service,
            args.service,
            zookeeper=registry,
            root=args.root,
            call_timeout=args.timeout,
        )
    instances = [
        static_instance(text, args.transport or "buffered", args.protocol or "binary")
        for text in args.instance
    ]
    return ServiceClient(service, args.service, instances=instances, call_timeout=args.timeout)


def static_instance(text: str, transport: str, protocol: str) -> Instance:
    """The instance ``HOST:PORT`` (``[v6]:PORT`` for an IPv6 address)."""
    host, _, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not host or not port.isdigit():
        raise UsageError(f"--instance must be HOST:PORT, not {text!r}")
    try:
        return Instance(host, int(port), transport=transport, protocol=protocol, id=text)
    except InvalidInstanceError as error:
        raise UsageError(f"--instance {text}: {error.reason}") from None


def declared_exception(service: Any, method: str, error: TException) -> dict[str, Any] | None:
    """``{"exception": type, "field": name, "value": {...}}`` for an exception ``method``
    declares (None for any other)."""
    spec = getattr(service, f"{method}_result").thrift_spec
    for key, field in spec.items():
        if key != 0 and field_types(field)[1] is type(error):
            return {
                "exception": type(error).__name__,
                "field": field[1],
                "value": struct_to_json(error),
            }
    return None


def _application_error_name(error: TApplicationException) -> str:
    names = {
        value: name
        for name, value in vars(TApplicationException).items()
        if name.isupper() and isinstance(value, int)
    }
    return names.get(error.type, str(error.type))
