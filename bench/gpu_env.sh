# Sourced by the GPU scripts: the packages the GPU image lacks, and what the device is.
# The image has JAX, Flax, Optax, Orbax and the rest, but not pydantic or tensorboardX:
# `make gpu-wheels` downloads those into .whl/ (ignored by git; pass it to the device tool's carry).
# Sets $py and writes $out/device.txt.
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
if [ -d .whl ]; then
    $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader | tee "$out/device.txt"
$py -c "import jax; print('jax', jax.__version__, jax.devices())" | tee -a "$out/device.txt"
