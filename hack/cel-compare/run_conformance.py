"""Run cases.json (from export_cases.py) through cel-expr-python and cel-python (celpy).
Usage: venv/bin/python run_conformance.py cases.json [--files basic,string,...] [--show-fail LIB] """
import os, sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import argparse, base64, datetime, json, math, re, sys, time, collections, traceback

PROTO_RE = re.compile(r"TestAllTypes|NestedMessage|google\.protobuf\.|cel\.expr\.conformance|GlobalEnum|\.proto2|\.proto3|NestedEnum|TestRequired")
EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)

# ---------------- expected-value helpers ----------------
def norm(tv):
    """Normalise a tagged value for comparison (maps unordered, NaN, timestamps to micros)."""
    t = tv["t"]
    if t == "list": return ("list", tuple(norm(x) for x in tv["v"]))
    if t == "map": return ("map", frozenset((norm(k), norm(v)) for k, v in tv["v"]))
    if t == "double":
        v = tv["v"]
        if isinstance(v, str): return ("double", v if v != "NaN" else "NaN")
        if math.isnan(v): return ("double", "NaN")
        if math.isinf(v): return ("double", "Infinity" if v > 0 else "-Infinity")
        return ("double", float(v))
    if t in ("timestamp", "duration"):
        return (t, tv["s"] * 1_000_000 + tv["n"] // 1000)
    if t == "null": return ("null",)
    return (t, tv["v"])

def py_of(tv):
    t = tv["t"]
    if t == "null": return None
    if t in ("bool", "int", "uint", "string"): return tv["v"]
    if t == "double":
        v = tv["v"]; return float(v) if not isinstance(v, str) else float({"NaN": "nan", "Infinity": "inf", "-Infinity": "-inf"}[v])
    if t == "bytes": return base64.b64decode(tv["v"])
    if t == "list": return [py_of(x) for x in tv["v"]]
    if t == "map": return {py_of(k): py_of(v) for k, v in tv["v"]}
    if t == "timestamp": return EPOCH + datetime.timedelta(seconds=tv["s"], microseconds=tv["n"] // 1000)
    if t == "duration": return datetime.timedelta(seconds=tv["s"], microseconds=tv["n"] // 1000)
    raise ValueError(t)

# ---------------- cel-expr-python ----------------
class CelExpr:
    name = "cel-expr-python"
    def __init__(self):
        from cel_expr_python import cel
        from cel_expr_python.ext import ext_strings, ext_optional, ext_math, ext_bindings, ext_encoders
        self.cel = cel
        self.exts = lambda: [ext_strings.ExtStrings(), ext_optional.ExtOptional(), ext_math.ExtMath(),
                             ext_bindings.ExtBindings(), ext_encoders.ExtEncoders()]
    def ctype(self, t):
        T = self.cel.Type
        if isinstance(t, dict):
            if "list" in t: return T.List(self.ctype(t["list"]))
            return T.Map(self.ctype(t["map"][0]), self.ctype(t["map"][1]))
        return {"bool": T.BOOL, "int": T.INT, "uint": T.UINT, "double": T.DOUBLE, "string": T.STRING,
                "bytes": T.BYTES, "timestamp": T.TIMESTAMP, "duration": T.DURATION, "dyn": T.DYN,
                "any": T.DYN, "null": T.NULL}[t]
    def run(self, case):
        cel = self.cel
        decls = {k: self.ctype(v) for k, v in case["decls"].items()}
        for k in case["bindings"]:
            decls.setdefault(k, cel.Type.DYN)
        from celexpr_env import new_env   # all std extensions enabled via EnvConfig YAML
        env = new_env(decls, container=case["container"] or None)
        try:
            e = env.compile(case["expr"], disable_check=case["disable_check"])
        except Exception as ex:
            return ("compile_error", str(ex))
        try:
            r = e.eval(data={k: py_of(v) for k, v in case["bindings"].items()})
        except RuntimeError as ex:   # some runtime errors are raised rather than returned
            return ("error", "raised: " + str(ex))
        if r.type() == cel.Type.ERROR:
            return ("error", r.value())
        return ("value", self.tag(r))
    def tag(self, r):
        cel = self.cel
        ty = r.type(); n = ty.name()
        v = r.value()
        if n == "error": return {"t": "error"}
        if ty == cel.Type.NULL: return {"t": "null"}
        if ty == cel.Type.BOOL: return {"t": "bool", "v": v}
        if ty == cel.Type.INT: return {"t": "int", "v": v}
        if ty == cel.Type.UINT: return {"t": "uint", "v": v}
        if ty == cel.Type.DOUBLE: return {"t": "double", "v": v}
        if ty == cel.Type.STRING: return {"t": "string", "v": v}
        if ty == cel.Type.BYTES: return {"t": "bytes", "v": base64.b64encode(bytes(v)).decode()}
        if ty == cel.Type.TIMESTAMP:
            d = v - EPOCH; us = d.days * 86400_000_000 + d.seconds * 1_000_000 + d.microseconds
            return {"t": "timestamp", "s": us // 1_000_000, "n": (us % 1_000_000) * 1000}
        if ty == cel.Type.DURATION:
            us = v.days * 86400_000_000 + v.seconds * 1_000_000 + v.microseconds
            s = int(us / 1_000_000); return {"t": "duration", "s": s, "n": (us - s * 1_000_000) * 1000}
        if n.startswith("list") or n.startswith("LIST"): return {"t": "list", "v": [self.tag(x) for x in v]}
        if n.startswith("map") or n.startswith("MAP"):
            return {"t": "map", "v": [[self.tag_plain(k), self.tag(x)] for k, x in v.items()]}
        if n.lower().startswith("type"):
            return {"t": "type", "v": v.name() if hasattr(v, "name") else str(v)}
        return {"t": "other:" + n, "v": repr(v)}
    def tag_plain(self, k):
        if isinstance(k, bool): return {"t": "bool", "v": k}
        if isinstance(k, int): return {"t": "int", "v": k}   # cannot distinguish uint keys
        if isinstance(k, str): return {"t": "string", "v": k}
        if hasattr(k, "type"): return self.tag(k)
        return {"t": "other", "v": repr(k)}

# ---------------- cel-python (celpy) ----------------
class CelPy:
    def __init__(self, compiled=False):
        import celpy
        from celpy import celtypes
        self.celpy, self.ct = celpy, celtypes
        self.runner = celpy.CompiledRunner if compiled else celpy.InterpretedRunner
        self.name = "cel-python" + (" (CompiledRunner)" if compiled else "")
    def conv(self, tv):
        ct = self.ct; t = tv["t"]
        if t == "null": return None
        if t == "bool": return ct.BoolType(tv["v"])
        if t == "int": return ct.IntType(tv["v"])
        if t == "uint": return ct.UintType(tv["v"])
        if t == "double": return ct.DoubleType(py_of(tv))
        if t == "string": return ct.StringType(tv["v"])
        if t == "bytes": return ct.BytesType(py_of(tv))
        if t == "list": return ct.ListType([self.conv(x) for x in tv["v"]])
        if t == "map": return ct.MapType({self.conv(k): self.conv(v) for k, v in tv["v"]})
        if t == "timestamp": return ct.TimestampType(py_of(tv))
        if t == "duration": return ct.DurationType(py_of(tv))
        raise ValueError(t)
    def run(self, case):
        celpy = self.celpy
        env = celpy.Environment(package=case["container"] or None, runner_class=self.runner)
        try:
            ast = env.compile(case["expr"])
            prg = env.program(ast)
        except Exception as ex:
            return ("compile_error", f"{type(ex).__name__}: {ex}")
        try:
            r = prg.evaluate({k: self.conv(v) for k, v in case["bindings"].items()})
        except celpy.CELEvalError as ex:
            return ("error", str(ex)[:200])
        except Exception as ex:   # anything else is an implementation crash
            return ("crash", f"{type(ex).__name__}: {str(ex)[:200]}")
        if isinstance(r, celpy.CELEvalError):
            return ("error", str(r)[:200])
        try:
            return ("value", self.tag(r))
        except Exception as ex:
            return ("crash", f"tag {type(ex).__name__}: {ex}")
    def tag(self, r):
        ct = self.ct
        if r is None: return {"t": "null"}
        if isinstance(r, ct.BoolType) or isinstance(r, bool): return {"t": "bool", "v": bool(r)}
        if isinstance(r, ct.UintType): return {"t": "uint", "v": int(r)}
        if isinstance(r, int): return {"t": "int", "v": int(r)}
        if isinstance(r, float): return {"t": "double", "v": float(r)}
        if isinstance(r, str): return {"t": "string", "v": str(r)}
        if isinstance(r, bytes): return {"t": "bytes", "v": base64.b64encode(bytes(r)).decode()}
        if isinstance(r, datetime.datetime):
            d = r - EPOCH; us = d.days * 86400_000_000 + d.seconds * 1_000_000 + d.microseconds
            return {"t": "timestamp", "s": us // 1_000_000, "n": (us % 1_000_000) * 1000}
        if isinstance(r, datetime.timedelta):
            us = r.days * 86400_000_000 + r.seconds * 1_000_000 + r.microseconds
            s = int(us / 1_000_000); return {"t": "duration", "s": s, "n": (us - s * 1_000_000) * 1000}
        if isinstance(r, list): return {"t": "list", "v": [self.tag(x) for x in r]}
        if isinstance(r, dict): return {"t": "map", "v": [[self.tag(k), self.tag(v)] for k, v in r.items()]}
        if isinstance(r, type):
            names = {ct.BoolType: "bool", ct.IntType: "int", ct.UintType: "uint", ct.DoubleType: "double",
                     ct.StringType: "string", ct.BytesType: "bytes", ct.ListType: "list", ct.MapType: "map",
                     ct.TimestampType: "google.protobuf.Timestamp", ct.DurationType: "google.protobuf.Duration",
                     ct.TypeType: "type", type(None): "null_type"}
            return {"t": "type", "v": names.get(r, r.__name__)}
        return {"t": "other:" + type(r).__name__, "v": repr(r)}

TYPE_ALIASES = {"NULL": "null_type", "LIST": "list", "MAP": "map", "NULL_TYPE": "null_type", "TYPE": "type",
                "google.protobuf.Timestamp": "google.protobuf.Timestamp", "TIMESTAMP": "google.protobuf.Timestamp",
                "DURATION": "google.protobuf.Duration"}
def type_name_norm(s):
    s = TYPE_ALIASES.get(s, s)
    return re.sub(r"<.*>$", "", s).lower() if "protobuf" not in s else s

def check(case, outcome):
    kind, payload = outcome
    exp = case["expect"]
    if "error" in exp:
        return kind in ("error", "compile_error") if not case["disable_check"] else kind == "error" or kind == "compile_error"
    if kind != "value": return False
    if exp["value"]["t"] == "type" and payload["t"] == "type":
        return type_name_norm(exp["value"]["v"]) == type_name_norm(payload["v"])
    try:
        return norm(exp["value"]) == norm(payload)
    except Exception:
        return False

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("cases"); ap.add_argument("--files", default="")
    ap.add_argument("--show-fail", default=""); ap.add_argument("--include-proto", action="store_true")
    ap.add_argument("--json-out", default="")
    ap.add_argument("--celpy-compiled", action="store_true", help="use celpy CompiledRunner (transpiler) instead of InterpretedRunner")
    a = ap.parse_args()
    cases = json.load(open(a.cases))
    files = set(a.files.split(",")) if a.files else None
    libs = [CelExpr(), CelPy(compiled=a.celpy_compiled)]
    table = collections.OrderedDict(); fails = collections.defaultdict(list); skipped = collections.Counter()
    for c in cases:
        if files and c["file"] not in files: continue
        if not c["supported"]: skipped[c["file"]] += 1; continue
        if not a.include_proto and PROTO_RE.search(c["expr"]): skipped[c["file"]] += 1; continue
        row = table.setdefault(c["file"], {"n": 0, **{l.name: 0 for l in libs}})
        row["n"] += 1
        for l in libs:
            try:
                out = l.run(c)
            except Exception as ex:
                out = ("crash", f"{type(ex).__name__}: {ex}")
            if check(c, out): row[l.name] += 1
            else: fails[l.name].append((c["id"], c["expr"], c["expect"], out))
    names = [l.name for l in libs]
    print(f"{'file':16} {'run':>5} {'skip':>5} " + " ".join(f"{n:>16}" for n in names))
    tot = collections.Counter()
    for f, row in table.items():
        print(f"{f:16} {row['n']:5} {skipped[f]:5} " + " ".join(f"{row[n]:16}" for n in names))
        tot["n"] += row["n"]; tot["skip"] += skipped[f]
        for n in names: tot[n] += row[n]
    print(f"{'TOTAL':16} {tot['n']:5} {tot['skip']:5} " + " ".join(f"{tot[n]:16}" for n in names))
    for n in names:
        if a.show_fail and a.show_fail in n:
            print(f"\n=== failures for {n} ({len(fails[n])}) ===")
            for cid, expr, exp, out in fails[n]:
                print(f"- {cid}: {expr!r}\n    expected {json.dumps(exp)[:150]}\n    got {str(out)[:200]}")
    if a.json_out:
        json.dump({"table": table, "fails": fails}, open(a.json_out, "w"), indent=1, default=str)

if __name__ == "__main__":
    main()
