"""Convert cel-spec tests/simple/testdata/*.textproto into cases.json (run with toolvenv: needs protobuf + generated gen/)."""
import base64, glob, json, math, os, sys
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "gen"))
from google.protobuf import text_format, timestamp_pb2, duration_pb2, struct_pb2, wrappers_pb2, any_pb2
from cel.expr.conformance.test import simple_pb2
from cel.expr import checked_pb2, value_pb2
# register message types so Any in textproto can be parsed
from cel.expr.conformance.proto2 import test_all_types_pb2 as _p2, test_all_types_extensions_pb2 as _p2e  # noqa
from cel.expr.conformance.proto3 import test_all_types_pb2 as _p3  # noqa
from google.protobuf import descriptor_pool, symbol_database

class Unsupported(Exception):
    pass

def dbl(x):
    if math.isnan(x): return "NaN"
    if math.isinf(x): return "Infinity" if x > 0 else "-Infinity"
    return x

def val(v):
    k = v.WhichOneof("kind")
    if k == "null_value": return {"t": "null"}
    if k == "bool_value": return {"t": "bool", "v": v.bool_value}
    if k == "int64_value": return {"t": "int", "v": v.int64_value}
    if k == "uint64_value": return {"t": "uint", "v": v.uint64_value}
    if k == "double_value": return {"t": "double", "v": dbl(v.double_value)}
    if k == "string_value": return {"t": "string", "v": v.string_value}
    if k == "bytes_value": return {"t": "bytes", "v": base64.b64encode(v.bytes_value).decode()}
    if k == "type_value": return {"t": "type", "v": v.type_value}
    if k == "list_value": return {"t": "list", "v": [val(x) for x in v.list_value.values]}
    if k == "map_value": return {"t": "map", "v": [[val(e.key), val(e.value)] for e in v.map_value.entries]}
    if k == "object_value":
        a = v.object_value
        if a.Is(timestamp_pb2.Timestamp.DESCRIPTOR):
            ts = timestamp_pb2.Timestamp(); a.Unpack(ts)
            return {"t": "timestamp", "s": ts.seconds, "n": ts.nanos}
        if a.Is(duration_pb2.Duration.DESCRIPTOR):
            d = duration_pb2.Duration(); a.Unpack(d)
            return {"t": "duration", "s": d.seconds, "n": d.nanos}
        raise Unsupported("object " + a.type_url)
    if k == "enum_value": raise Unsupported("enum")
    raise Unsupported("kind " + str(k))

def typ(t):
    k = t.WhichOneof("type_kind")
    if k == "primitive":
        return {1: "bool", 2: "int", 3: "uint", 4: "double", 5: "string", 6: "bytes"}[t.primitive]
    if k == "well_known":
        return {1: "any", 2: "timestamp", 3: "duration"}[t.well_known]
    if k == "dyn": return "dyn"
    if k == "null": return "null"
    if k == "list_type": return {"list": typ(t.list_type.elem_type)}
    if k == "map_type": return {"map": [typ(t.map_type.key_type), typ(t.map_type.value_type)]}
    raise Unsupported("type " + str(k))

out = []
stats = {}
for path in sorted(glob.glob(sys.argv[1] + "/*.textproto")):
    fname = os.path.basename(path)[:-len(".textproto")]
    tf = simple_pb2.SimpleTestFile()
    try:
        text_format.Parse(open(path).read(), tf, descriptor_pool=descriptor_pool.Default())
    except Exception as ex:
        print("PARSE-FAIL", fname, str(ex)[:200]); stats[fname] = "parse-fail"; continue
    n = ok = 0
    for sec in tf.section:
        for t in sec.test:
            n += 1
            case = {"id": f"{fname}/{sec.name}/{t.name}", "file": fname, "expr": t.expr,
                    "disable_check": t.disable_check, "check_only": t.check_only,
                    "disable_macros": t.disable_macros, "container": t.container}
            try:
                if t.disable_macros: raise Unsupported("disable_macros")
                if t.check_only: raise Unsupported("check_only")
                if t.locale: raise Unsupported("locale")
                decls = {}
                for d in t.type_env:
                    if d.WhichOneof("decl_kind") == "ident":
                        decls[d.name] = typ(d.ident.type)
                    else:
                        raise Unsupported("function decl")
                case["decls"] = decls
                case["bindings"] = {}
                for name, ev in t.bindings.items():
                    if ev.WhichOneof("kind") != "value": raise Unsupported("non-value binding")
                    case["bindings"][name] = val(ev.value)
                m = t.WhichOneof("result_matcher")
                if m is None: case["expect"] = {"value": {"t": "bool", "v": True}}
                elif m == "value": case["expect"] = {"value": val(t.value)}
                elif m == "typed_result": case["expect"] = {"value": val(t.typed_result.result)}
                elif m in ("eval_error", "any_eval_errors"): case["expect"] = {"error": True}
                else: raise Unsupported("matcher " + m)
                ok += 1
                case["supported"] = True
            except Unsupported as ex:
                case["supported"] = False; case["why"] = str(ex)
            out.append(case)
    stats[fname] = f"{ok}/{n}"
json.dump(out, open(sys.argv[2], "w"), indent=0)
print(json.dumps(stats, indent=1))
