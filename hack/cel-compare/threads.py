"""Concurrency check: 4 threads share ONE compiled program, each evaluates with its own data and
checks it gets its own answer. Usage: venv/bin/python threads.py {celexpr|celpy-interp|celpy-compiled}"""
import os, sys, threading, time
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.setswitchinterval(1e-6)   # force very frequent GIL hand-offs to expose races
which = sys.argv[1]
SRC = "obj.spec.items.filter(x, x.startsWith(obj.prefix)).map(x, x + '-' + obj.prefix)[0]"
THREADS, N = 4, 2000 if which != "celexpr" else 20000
def data(t):
    return {"obj": {"prefix": f"p{t}", "spec": {"items": [f"q{i}" for i in range(5)] + [f"p{t}x"]}}}
if which == "celexpr":
    from cel_expr_python import cel
    from celexpr_env import new_env
    env = new_env({"obj": cel.Type.DYN})
    prg = env.compile(SRC); prg.eval(data=data(0))
    def ev(d): return prg.eval(data=d).value()
else:
    import celpy
    env = celpy.Environment(runner_class=celpy.CompiledRunner if which == "celpy-compiled" else celpy.InterpretedRunner)
    prg = env.program(env.compile(SRC))
    def ev(d): return prg.evaluate({"obj": celpy.json_to_cel(d["obj"])})
bad = []; errs = []
def worker(t):
    d = data(t); want = f"p{t}x-p{t}"
    for _ in range(N):
        try:
            got = ev(d)
        except Exception as ex:
            errs.append(repr(ex)[:100]); continue
        if got != want: bad.append((t, got))
t0 = time.perf_counter()
ths = [threading.Thread(target=worker, args=(t,)) for t in range(THREADS)]
[x.start() for x in ths]; [x.join() for x in ths]
el = time.perf_counter() - t0
print(f"{which}: {THREADS}x{N} evals in {el:.2f}s ({el/THREADS/N*1e6:.1f} µs/eval wall), wrong results={len(bad)}, exceptions={len(errs)}",
      (bad[:2], errs[:2]) if bad or errs else "")
