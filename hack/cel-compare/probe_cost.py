"""Shows the fixed 10k iteration budget does not bound memory/time: amplification under budget."""
import os, sys, time, resource
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cel_expr_python import cel
from celexpr_env import new_env
env = new_env({})
SRC = ("cel.bind(a, lists.range(1000).map(i, 'xxxxxxxxxx').join(''), "      # 10 KB string, 1000 iterations
       "cel.bind(b, lists.range(1000).map(j, a).join(''), "                   # 10 MB string, 1000 iterations
       "lists.range(%d).map(k, b + b).size()))")                             # N x 20 MB
for n in (1, 10, 40):
    t0 = time.perf_counter()
    r = env.compile(SRC % n).eval()
    print(f"N={n}: result={r.value()} time={time.perf_counter()-t0:.2f}s maxRSS={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1024:.0f} MB")
# nesting / size limits of the parser
for depth in (100, 250, 1000):
    try:
        env.compile("(" * depth + "1" + ")" * depth); print(f"paren depth {depth}: ok")
    except RuntimeError as ex: print(f"paren depth {depth}: {str(ex).splitlines()[0][:100]}")
for n in (10_000, 200_000):
    try:
        env.compile(" + ".join(["1"] * (n // 4))); print(f"expr of ~{n} chars: ok")
    except RuntimeError as ex: print(f"expr of ~{n} chars: {str(ex).splitlines()[0][:100]}")
e = env.compile("lists.range(10).map(i, i * 2)")
print("serialized checked AST bytes (AST size proxy):", len(e.serialize()))
