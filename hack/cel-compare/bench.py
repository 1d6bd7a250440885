"""Speed + memory: compile & eval of two representative policy expressions.
Usage: venv/bin/python bench.py [N_EVALS]"""
import datetime, gc, os, resource, sys, time
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cel_expr_python import cel
from celexpr_env import new_env
import celpy
from celpy import celtypes

# celpy caches ONE lark parser per process (CELParser.CEL_PARSER), built with the first runner's tree
# class, so InterpretedRunner and CompiledRunner cannot be mixed in one process -> one section per run.
SECTION = sys.argv[1] if len(sys.argv) > 1 else "celexpr"   # celexpr | celpy-interp | celpy-compiled | mem-celexpr | mem-celpy
N = int(sys.argv[2]) if len(sys.argv) > 2 else 10_000
EXPR_A = "namespaceObject.metadata.labels['data-class'] != 'restricted' || duration(task.spec.ttl) <= duration('10m')"
EXPR_B = "now.getHours('Europe/Berlin') >= 7 && now.getHours('Europe/Berlin') < 20"
NOW = datetime.datetime(2024, 6, 1, 12, 0, tzinfo=datetime.timezone.utc)

def make_data(big=False):
    labels = {"data-class": "restricted", "env": "prod"}
    if big:
        labels.update({f"label-{i}": f"value-{i}" for i in range(200)})
    spec = {"ttl": "5m", "image": "x:1", "args": ["--a"] * (500 if big else 1)}
    return {"namespaceObject": {"metadata": {"name": "ns", "labels": labels}},
            "task": {"spec": spec, "metadata": {"name": "t"}}, "now": NOW}

def rss_kb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1])

def timeit(fn, n):
    fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e6

results = []
# ---------------- cel-expr-python ----------------
VARS = {"namespaceObject": cel.Type.DYN, "task": cel.Type.DYN, "now": cel.Type.TIMESTAMP}
def sec_celexpr():
    t0 = time.perf_counter(); env = new_env(VARS); env.compile("true").eval(); t_env = (time.perf_counter() - t0) * 1e6
    results.append(("cel-expr-python", "Env creation (+ first compile/eval, one-time)", t_env))
    for label, src in (("A", EXPR_A), ("B", EXPR_B)):
        # compile() = parse+type-check; the runtime Program is built lazily on the first eval
        c_us = timeit(lambda: env.compile(src), 2000)
        cp_us = timeit(lambda: env.compile(src).eval(data=make_data()), 2000)
        e = env.compile(src)
        for big in (False, True):
            d = make_data(big)
            r = e.eval(data=d); assert r.type() == cel.Type.BOOL and r.value() is True, (r.type().name(), r.value())
            ev = timeit(lambda: e.eval(data=d), N)
            results.append(("cel-expr-python", f"expr {label} eval ({'big' if big else 'small'} input)", ev))
        act = env.Activation(make_data())
        results.append(("cel-expr-python", f"expr {label} eval via reused Activation", timeit(lambda: e.eval(act), N)))
        results.append(("cel-expr-python", f"expr {label} compile (parse+check)", c_us))
        results.append(("cel-expr-python", f"expr {label} compile + first eval (incl. program build)", cp_us))

# ---------------- celpy ----------------
def sec_celpy(runner):
    rn = "cel-python/" + runner.__name__
    cenv = celpy.Environment(runner_class=runner)
    for label, src in (("A", EXPR_A), ("B", EXPR_B)):
        c_us = timeit(lambda: cenv.program(cenv.compile(src)), 200)
        prg = cenv.program(cenv.compile(src))
        for big in (False, True):
            raw = make_data(big)
            def conv(raw=raw):
                act = {k: celpy.json_to_cel(v) for k, v in raw.items() if k != "now"}
                act["now"] = celtypes.TimestampType(raw["now"])
                return act
            act = conv()
            r = prg.evaluate(act); assert r is True or r == celtypes.BoolType(True), r
            n = max(N // 10, 500)
            results.append((rn, f"expr {label} eval ({'big' if big else 'small'} input, pre-converted)", timeit(lambda: prg.evaluate(act), n)))
            results.append((rn, f"expr {label} json_to_cel conversion ({'big' if big else 'small'} input)", timeit(conv, n)))
        results.append((rn, f"expr {label} compile (parse + program)", c_us))

# ---------------- memory per compiled program ----------------
def mem_per_program(make, n=1000):
    gc.collect(); before = rss_kb()
    keep = [make(i) for i in range(n)]
    gc.collect(); after = rss_kb()
    return (after - before) / n, keep

def sec_mem_celexpr():
    env2 = new_env(VARS)
    def mk_cel(i):
        e = env2.compile(EXPR_A.replace("'10m'", f"'{i}m'")); e.eval(data=make_data()); return e
    mk_cel(0)
    kb, keep = mem_per_program(mk_cel); del keep
    results.append(("cel-expr-python", "RSS per compiled+evaluated program (KB, expr A, 1000 distinct)", kb))
def sec_mem_celpy():
    cenv = celpy.Environment()
    cenv.program(cenv.compile("1"))
    kb, keep = mem_per_program(lambda i: cenv.program(cenv.compile(EXPR_A.replace("'10m'", f"'{i}m'")))); del keep
    results.append(("cel-python/InterpretedRunner", "RSS per program (KB, expr A, 1000 distinct)", kb))

{"celexpr": sec_celexpr, "celpy-interp": lambda: sec_celpy(celpy.InterpretedRunner),
 "celpy-compiled": lambda: sec_celpy(celpy.CompiledRunner), "mem-celexpr": sec_mem_celexpr,
 "mem-celpy": sec_mem_celpy}[SECTION]()

for lib, what, v in results:
    unit = "KB" if "KB" in what else "µs"
    print(f"{lib:30} {what:68} {v:10.1f} {unit}")
print("max RSS MB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
