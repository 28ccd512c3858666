import sys, time
_t = time.perf_counter()
try:
    exec(compile(open("/work/main/app.py").read(), "/work/main/app.py", "exec"))
finally:
    print(f"SCRIPT {time.perf_counter() - _t:.3f}", file=sys.stderr, flush=True)
