#!/usr/bin/env bash
# The GPU checks in one prepared run, for a session lent the GPU machine (15 minutes of device time in all):
#   bash benchmarks/gpu_check.sh            # run from the repository root there; logs go to $OUT (or /tmp/gpu_check)
# 1. the test suite's CUDA tests (the CUDA-graph decode step; the training engine's CUDA paths where present);
# 2. bench_llm on a Qwen2-7B-shaped LLaMA in bf16 at batch 1: transformers' generate vs ours eager, with the CUDA
#    graph, and with the compiled step, as a fraction of the memory-bandwidth ceiling (issue 3's GPU goal).
# 3. bench_llava on LLaVA-1.5-7B's shape in bf16 (time to first token, decode).
# 4. bench_qwen2_vl on Qwen2-VL-7B's and Qwen2.5-VL-7B's shapes in bf16: the vision towers on a 1008x1008 image
#    (grid 1x72x72; issue 13: Qwen2-VL >= 1.2x transformers', Qwen2.5-VL's windowed tower faster than Qwen2-VL's)
#    and decode against the bandwidth ceiling.
# 5. bench_mllama on Llama-3.2-11B-Vision's shape in bf16: the vision encoder on 1- and 4-tile images, time to first
#    token (vision encoder, cross keys/values, prefill) and decode.
# 6. bench_diffusion against diffusers in bf16 (issue 17): one U-Net classifier-free-guidance step of SD 1.5 at
#    512 px and of SDXL base at 1024 px, one SD3-medium MM-DiT CFG step at 1024 px (text 154 x 4096), with peak memory.
# Steps 1-5 need only what that machine's image holds (torch, transformers, safetensors, tokenizers, jinja2, pytest).
# Step 6 also needs diffusers: where the image lacks it, a wheel in .gpu_deps/ (carried: `pip download --no-deps
# diffusers==0.42.1 -d .gpu_deps`) is unpacked beside the run; without either, step 6 says so and is skipped.
set -u -o pipefail
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/gpu_check}"
mkdir -p "$OUT"
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name())" 2>&1 | tee "$OUT/gpu.txt"
timeout 120 python3 -m pytest -q -p no:cacheprovider -k "cuda or gpu" tests/test_generation.py tests/test_train.py \
    2>&1 | tee "$OUT/tests.log"
timeout 420 python3 benchmarks/bench_llm.py --sizes 7b --device cuda --dtype bf16 --batches 1 --prompt 128 \
    --new 64 --rounds 3 --modes eager,static,compile 2>&1 | tee "$OUT/bench_llm_7b.log"
# 3. LLaVA-1.5-7B's shape in bf16, one 336-px image + 64 text tokens: time to first token and decode (issue 12)
timeout 300 python3 benchmarks/bench_llava.py --sizes 7b --device cuda --dtype bf16 --batches 1 --prompt 64 \
    --new 64 --rounds 3 --static 2>&1 | tee "$OUT/bench_llava_7b.log"
# 4. Qwen2-VL-7B / Qwen2.5-VL-7B shapes in bf16: the towers on a 1008^2 image, then first token and decode (issue 13)
timeout 300 python3 benchmarks/bench_qwen2_vl.py --sizes 7b --device cuda --dtype bf16 --batches 1 \
    --grids 1x72x72 --prompt 64 --new 64 --rounds 3 2>&1 | tee "$OUT/bench_qwen2_vl_7b.log"
# 5. Llama-3.2-11B-Vision's shape in bf16 (1280-wide 32 + 8 layer vision encoder on 560-px tiles, 4096-wide decoder of
#    40 layers, 8 of them gated cross-attention): the vision encoder on 1 and 4 tiles, then first token and decode
timeout 360 python3 benchmarks/bench_mllama.py --sizes 11b --device cuda --dtype bf16 --batches 1 --tiles 1,4 \
    --prompt 64 --new 64 --rounds 3 2>&1 | tee "$OUT/bench_mllama_11b.log"
# 6. Stable Diffusion denoisers against diffusers in bf16 (issue 17: U-Net CFG step SD 1.5 at 512 px, SDXL at
#    1024 px; SD3-medium MM-DiT CFG step at 1024 px), peak CUDA memory per side in a fresh process
if ! python3 -c "import diffusers" 2>/dev/null; then
    wheel=$(ls .gpu_deps/diffusers-*.whl 2>/dev/null | head -1)
    if [ -n "$wheel" ]; then
        python3 -m zipfile -e "$wheel" /tmp/gpu_deps && export PYTHONPATH="/tmp/gpu_deps:$PYTHONPATH"
    fi
fi
if python3 -c "import diffusers" 2>/dev/null; then
    timeout 240 python3 benchmarks/bench_diffusion.py --cases sd15 --px 512 --device cuda --dtype bfloat16 \
        --rounds 10 --memory 2>&1 | tee "$OUT/bench_diffusion_sd15_512.log"
    timeout 420 python3 benchmarks/bench_diffusion.py --cases sdxl,sd3-medium --px 1024 --device cuda \
        --dtype bfloat16 --rounds 10 --memory 2>&1 | tee "$OUT/bench_diffusion_1024.log"
else
    echo "diffusers is not importable here (no .gpu_deps/diffusers-*.whl carried): bench_diffusion skipped" \
        | tee "$OUT/bench_diffusion.log"
fi
