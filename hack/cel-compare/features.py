"""Feature matrix: run the same expressions through cel-expr-python (all std extensions) and celpy."""
import datetime, os, sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cel_expr_python import cel
from celexpr_env import new_env
import celpy
from celpy import celtypes

NOW = datetime.datetime(2024, 6, 1, 12, 0, tzinfo=datetime.timezone.utc)  # 14:00 in Berlin (CEST)
DATA = {
    "namespaceObject": {"metadata": {"name": "team-a", "labels": {"data-class": "restricted", "env": "Prod"}}},
    "task": {"spec": {"ttl": "5m", "image": "registry.example/app:1.2", "replicas": 3, "args": ["--a", "--b"],
                      "opt": None}},
    "now": NOW,
}
EXPRS = [
    ("string ext", "namespaceObject.metadata.labels.env.lowerAscii() == 'prod' && 'ab'.upperAscii() == 'AB'"),
    ("string ext", "task.spec.image.split(':')[1] == '1.2'"),
    ("string ext", "'a-b'.replace('-', '_') == 'a_b' && ['x','y'].join(',') == 'x,y'"),
    ("string ext", "task.spec.image.indexOf(':') == 20 && task.spec.image.substring(0, 8) == 'registry'"),
    ("string ext", "'  x '.trim() == 'x'"),
    ("string ext", "'%s has %d replicas'.format([namespaceObject.metadata.name, task.spec.replicas]) == 'team-a has 3 replicas'"),
    ("std string", "task.spec.image.startsWith('registry.') && task.spec.image.endsWith('1.2') && task.spec.image.contains('app')"),
    ("matches", "task.spec.image.matches('^registry\\\\.example/[a-z]+:[0-9.]+$')"),
    ("matches RE2 (lookahead must be rejected)", "'ab'.matches('a(?=b)')"),
    ("macros", "task.spec.args.all(a, a.startsWith('--')) && task.spec.args.exists(a, a == '--b')"),
    ("macros", "task.spec.args.exists_one(a, a == '--a') && task.spec.args.map(a, size(a)) == [3, 3]"),
    ("macros", "task.spec.args.filter(a, a != '--a') == ['--b']"),
    ("macros on map keys", "namespaceObject.metadata.labels.exists(k, k == 'env')"),
    ("optional ?.", "namespaceObject.?metadata.?annotations.?owner.orValue('none') == 'none'"),
    ("optional [?key]", "namespaceObject.metadata.labels[?'tier'].orValue('default') == 'default'"),
    ("optional hasValue", "namespaceObject.metadata.labels[?'env'].hasValue()"),
    ("timestamp()", "now > timestamp('2024-01-01T00:00:00Z')"),
    ("duration cmp", "duration(task.spec.ttl) <= duration('10m')"),
    ("ts + duration", "now + duration('1h') == timestamp('2024-06-01T13:00:00Z')"),
    ("ts - ts", "now - timestamp('2024-06-01T11:00:00Z') == duration('1h')"),
    ("getHours(tz)", "now.getHours('Europe/Berlin') == 14"),
    ("getHours(utc)", "now.getHours() == 12 && now.getDayOfWeek() == 6"),
    ("getHours(+offset)", "now.getHours('+02:00') == 14"),
    ("has()", "has(namespaceObject.metadata.labels) && !has(namespaceObject.metadata.annotations)"),
    ("in map", "'env' in namespaceObject.metadata.labels"),
    ("in list", "'--a' in task.spec.args"),
    ("null compare", "task.spec.opt == null"),
    ("missing key -> error", "namespaceObject.metadata.annotations.owner == 'x'"),
    ("int/string conv", "int('42') + 1 == 43 && string(3) == '3'"),
    ("heterogeneous eq", "dyn(1) == 1.0"),
    ("reserved word `namespace` as variable", "namespace.metadata.name == 'team-a'"),
    ("K8s quantity()", "quantity('1Gi').isGreaterThan(quantity('500Mi'))"),
    ("K8s url()", "url('https://x.io/p').getHost() == 'x.io'"),
    ("K8s ip()/cidr()", "cidr('10.0.0.0/8').containsIP(ip('10.1.2.3'))"),
    ("sets.*", "sets.contains(['a','b'], ['a'])"),
    ("lists ext", "[3,1,2].sort() == [1,2,3] && lists.range(3) == [0,1,2]"),
    ("K8s isSorted()", "[1,2,3].isSorted()"),
    ("regex ext", "regex.extract('v1.2', '[0-9]+').orValue('') == '1'"),
    ("math ext", "math.greatest(1, 5, 3) == 5"),
    ("cel.bind", "cel.bind(l, namespaceObject.metadata.labels, l.env == 'Prod')"),
    ("two-var macros", "namespaceObject.metadata.labels.all(k, v, v != '')"),
]

def run_celexpr():
    env = new_env({"namespaceObject": cel.Type.DYN, "namespace": cel.Type.DYN, "task": cel.Type.DYN, "now": cel.Type.TIMESTAMP})
    out = []
    for _, src in EXPRS:
        try:
            e = env.compile(src)
        except RuntimeError as ex:
            out.append("compile-err: " + str(ex).split("\n")[0][:70]); continue
        try:
            r = e.eval(data=DATA)
        except RuntimeError as ex:
            out.append("raised: " + str(ex)[:60]); continue
        out.append(("ERROR value: " + str(r.value())[:60]) if r.type() == cel.Type.ERROR else repr(r.plain_value()))
    return out

def run_celpy():
    env = celpy.Environment()
    act = {k: celpy.json_to_cel(v) for k, v in DATA.items() if k != "now"}
    act["namespace"] = act["namespaceObject"]
    act["now"] = celtypes.TimestampType(NOW)
    out = []
    for _, src in EXPRS:
        try:
            prg = env.program(env.compile(src))
        except Exception as ex:
            out.append("compile-err: " + type(ex).__name__); continue
        try:
            r = prg.evaluate(act)
            out.append(repr(r)[:60])
        except celpy.CELEvalError as ex:
            out.append("CELEvalError: " + str(ex.args[0])[:60])
        except Exception as ex:
            out.append(f"crash {type(ex).__name__}: {str(ex)[:50]}")
    return out

if __name__ == "__main__":
    a, b = run_celexpr(), run_celpy()
    for (feat, src), x, y in zip(EXPRS, a, b):
        print(f"## {feat}: {src}\n   cel-expr-python: {x}\n   cel-python     : {y}")
