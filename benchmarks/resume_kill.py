"""Resume after SIGKILL on the default model (issue 20, must-show 3): a SparseGPT 50% + GPTQ w4 g64 run (P1
calibration and eval) is run once uninterrupted, then killed with SIGKILL at three moments (in a block at a
random time; right after the quant stage's 5th block checkpoint; while the model is being saved, once the
temporary save directory holds a safetensors file) and each time started again with the same command. Logs
the finished blocks at the kill, the resumed run's stage seconds and whether its weights' sha256 equals the
uninterrupted run's. Run from a checkout (the working directory is the source tree the runs import):

    cd <checkout> && python benchmarks/resume_kill.py     # writes /tmp/scale/resume/driver.log
"""
"""Kill a real-model run with SIGKILL at 3 moments (in a block at a random time, right after a block's
checkpoint, while the model is saved), restart it each time with the same command, compare weights."""
import glob, json, os, random, signal, subprocess, sys, time
base = "/tmp/scale/resume"
os.makedirs(base, exist_ok=True)
try:  # one driver at a time, once
    os.close(os.open(f"{base}/LOCK", os.O_CREAT | os.O_EXCL))
except FileExistsError:
    sys.exit(0)
ARGS = ["prune=sparsegpt", "prune.sparsity=0.5", "quant=gptq", "quant.bits=4", "quant.group_size=64", "output.save_model=true"]
def cmd(d): return [sys.executable, "-m", "compress", *ARGS, f"hydra.run.dir={d}"]
log = open(f"{base}/driver.log", "a")
def say(*a):
    print(*a, file=log, flush=True)
def fp(d):
    data = json.load(open(f"{d}/results.json"))
    s = next(x for x in data["stages"] if x["name"] == "save")
    return data, s["fingerprint"]["sha256"]
ref = f"{base}/ref"
if not os.path.exists(f"{ref}/results.json"):
    t0 = time.time(); subprocess.run(cmd(ref), cwd=os.getcwd(), stdout=open(f"{ref}.log", "w"), stderr=subprocess.STDOUT); say("ref", time.time() - t0)
rdata, rsha = fp(ref)
say("ref sha", rsha, rdata["metrics"]["ppl"], [(s["name"], s["seconds"]) for s in rdata["stages"]])
random.seed(20261204)
for kind in ("random_in_block", "after_checkpoint", "during_save"):
    d = f"{base}/{kind}"
    p = subprocess.Popen(cmd(d), cwd=os.getcwd(), stdout=open(f"{d}.kill.log", "w"), stderr=subprocess.STDOUT)
    t0 = time.time()
    if kind == "random_in_block":
        t = random.uniform(20, 150)
        while time.time() - t0 < t and p.poll() is None:
            time.sleep(0.05)
        why = f"at {t:.1f} s"
    elif kind == "after_checkpoint":  # the 5th state.json of the quant stage just renamed into place
        target = None
        while p.poll() is None:
            f = f"{d}/checkpoint/quant/state.json"
            if os.path.exists(f):
                try:
                    done = json.load(open(f))["done"]
                except Exception:
                    done = -1
                if done >= 4:
                    break
            time.sleep(0.005)
        why = f"after quant block {done}'s checkpoint, at {time.time() - t0:.1f} s"
    else:
        while p.poll() is None and not glob.glob(f"{d}/.model.tmp-*/*.safetensors"):
            time.sleep(0.005)
        why = f"while saving ({glob.glob(f'{d}/.model.tmp-*/*')}), at {time.time() - t0:.1f} s"
    p.send_signal(signal.SIGKILL); p.wait()
    fin = {}
    for sd in glob.glob(f"{d}/checkpoint/*/state.json"):
        try:
            fin[sd.split("/")[-2]] = json.load(open(sd))["done"] + 1
        except Exception as e:
            fin[sd.split("/")[-2]] = repr(e)
    say(kind, "killed", why, "rc", p.returncode, "finished blocks", fin)
    t1 = time.time()
    r = subprocess.run(cmd(d), cwd=os.getcwd(), stdout=open(f"{d}.resume.log", "w"), stderr=subprocess.STDOUT)
    data, sha = fp(d)
    say(kind, "resumed rc", r.returncode, "in", round(time.time() - t1, 1), "s; sha equal:", sha == rsha, "ppl", data["metrics"]["ppl"],
        "resume", data.get("resume"), [(s["name"], s["seconds"], s.get("resumed_at_block")) for s in data["stages"]])
say("done")
open(f"{base}/ALL_DONE", "w").close()
