"""Streamlit helpers shared by app.py and the pages: the sidebar, cached loaders (uploads: pages/uploads.py).

This is the only module besides the pages that imports streamlit. Caching, so that returning to a
page is instant:

- models: ``st.cache_resource``, one copy shared by every browser session and never modified
  (quantization builds new blocks, the pipeline never touches the original);
- a page's tables and figures: ``cached_view`` (``st.cache_resource`` too: no copy per hit, see there);
- long work that reports progress (quantization runs, calibration passes, sensitivity):
  ``pages.runs.ResultStore``, a bounded memo, because ``st.cache_data`` replays the elements a cached function
  draws into and a progress bar belongs to the page that called it;
- small results that need a private copy per session: ``st.cache_data``.

Every cache key starts with ``results_key()``: the model choice and the loaded object.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import streamlit as st

from quantlab.models import loading as models
from quantlab.models import uploads
from quantlab.analysis import tensors
from quantlab.device import LOAD_DTYPES, available_devices
from quantlab.errors import QuantLabError
from quantlab.numerics.formats import RANGE_METHODS, SCALE_DTYPES, Granularity, QuantFormat
from pages.uploads import (  # noqa: F401  (SessionFolder: re-exported for the session tests)
    SessionFolder, save_upload, server_policy, session_folder, sweep_uploads, touch_session,
)
from quantlab.models.paths import REMOTE_CODE_ENV, allowed_path, allowed_source, printable
from quantlab.numerics.minifloats import BLOCK_SPECS
from quantlab.models.weightfiles import describe_skipped

BUNDLED_LM_LABEL = f"Bundled LM ({models.BUNDLED_LM})"
BUNDLED_ENCODER_LABEL = f"Bundled encoder ({models.BUNDLED_ENCODER})"
HUB_LABEL = "Hugging Face hub id (needs network)"
FOLDER_LABEL = "Local path (folder, .safetensors or shard index)"
UPLOAD_LABEL = "Upload .safetensors"
MODEL_CHOICES = (BUNDLED_LM_LABEL, BUNDLED_ENCODER_LABEL, HUB_LABEL, FOLDER_LABEL, UPLOAD_LABEL)
FORMAT_KINDS = ("int", "fp8-e4m3", "fp8-e5m2", "nf4", *BLOCK_SPECS)  # then mxfp4, nvfp4, fp8-block, ...
GROUP_SIZES = (16, 32, 64, 128, 256)
GRANULARITIES = ("per-channel", "group", "per-tensor")

# Everything imported by now (torch, transformers, pandas, plotly: millions of objects) lives as long as
# the process. Frozen once, at first import, it is no longer re-scanned by every full garbage collection,
# which otherwise adds up to a second to a page switch on a busy 2-core machine (bench/bench_pages.py).
# Objects created later, sessions' work included, are collected as usual.
gc.freeze()


def export_zip(model, tokenizer, name: str) -> bytes:
    """Export a quantized model into the session folder, zip it, and return the zip's bytes."""
    from quantlab.runs.export import export_compressed

    digest = hashlib.sha256(f"{name}-{id(model)}".encode()).hexdigest()[:12]
    folder = session_folder() / f"export-{digest}"
    if not folder.exists():
        export_compressed(model, folder, tokenizer)
    archive = shutil.make_archive(str(folder), "zip", folder)
    return Path(archive).read_bytes()


def cached_view(max_entries: int = 32, spinner: str | bool = False):
    """Cache a page's tables and figures, shared by all sessions and never copied; treat them as read-only.

    Not st.cache_data: it unpickles a copy on every hit, and a Plotly figure re-validates every
    property when it is rebuilt, which costs more than computing the view again.
    """
    return st.cache_resource(max_entries=max_entries, show_spinner=spinner)


# --- errors ------------------------------------------------------------------------------------
@contextmanager
def user_errors():
    """Show bad input (any QuantLabError) as a message in the page and stop it, never a traceback."""
    try:
        yield
    except QuantLabError as exc:
        st.error(printable(_in_user_terms(str(exc))), icon="⚠️")  # a lone surrogate in a tensor name cannot be sent
        st.stop()
    except RecursionError:  # a parser given JSON nested past Python's recursion limit
        st.error("the file is nested too deeply to be read; it is not a file QuantLab wrote", icon="⚠️")
        st.stop()


def _in_user_terms(message: str) -> str:
    """A message about the chosen upload names the file the user uploaded, not its content-hash copy."""
    choice = model_choice()
    if choice is None or choice.upload_name is None or choice.weights_path is None:
        return message
    return uploads.in_user_terms(message, Path(choice.weights_path), choice.upload_name)


# --- the model ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelChoice:
    """What the sidebar selected: a model to load, or a bare weights file (``weights_path``)."""

    label: str
    source: str | None  # what load_model takes; None for an upload
    weights_path: str | None = None  # an uploaded safetensors file in the session folder
    device: str = "cpu"
    trust_remote_code: bool = False
    dtype: str = "auto"  # what the weights are loaded in; auto is the checkpoint's own
    upload_name: str | None = None  # an upload's own name (display_name), which messages use, not the hash

    @property
    def key(self) -> str:
        """Identifies the chosen weights (an upload's path already holds its content hash)."""
        return f"{self.source or self.weights_path}@{self.device}/{self.dtype}"


@st.cache_resource(max_entries=3, show_spinner="Loading the model…")
def cached_model(source: str, device: str, trust_remote_code: bool = False, dtype: str = "auto") -> models.LoadedModel:
    return models.load_model(source, device=device, dtype=dtype, trust_remote_code=trust_remote_code)


@st.cache_resource(max_entries=2, show_spinner="Reading the weights file…")
def cached_file_tensors(path: str) -> dict:
    """A weights file, shard index or folder, memory-mapped: a page reads only the matrices it shows."""
    return models.map_tensors(path)


def model_choice() -> ModelChoice | None:
    return st.session_state.get("_model_choice")


def current_model() -> models.LoadedModel | None:
    """The chosen model (loaded once, shared), or None when the choice is a bare weights file."""
    choice = model_choice()
    if choice is None or choice.source is None:
        return None
    with user_errors():
        return cached_model(choice.source, choice.device, choice.trust_remote_code, choice.dtype)


def results_key() -> str:
    """Keys cached results: the choice plus the loaded object, so a reloaded model never meets stale results."""
    choice = model_choice()
    loaded = current_model()
    return choice.key if loaded is None else f"{choice.key}#{id(loaded.model)}"


def require_model(what: str) -> models.LoadedModel:
    """The chosen model; when a bare weights file is chosen, say why this page needs a model and stop."""
    loaded = current_model()
    if loaded is None:
        st.info(f"{what} needs a model that runs (config and tokenizer), not a bare weights file. "
                "Choose the bundled LM, the bundled encoder, a hub id or a model folder in the sidebar.")
        st.stop()
    return loaded


def current_matrices() -> list[tensors.NamedMatrix]:
    """The quantizable weight matrices of the chosen model or weights file, (out, in) each."""
    choice = model_choice()
    if choice is None:
        st.stop()
    with user_errors():
        if choice.weights_path is not None:
            _file_notes(choice.weights_path)
            return tensors.file_matrices(cached_file_tensors(choice.weights_path))
        return tensors.model_matrices(current_model().model)


@st.cache_data(show_spinner=False, max_entries=4)
def _file_notes(path: str) -> None:
    """Say which tensors of a weights file the pages leave out, and which matrices hold NaN or Inf."""
    if skipped := models.skipped_tensors(cached_file_tensors(path)):
        st.caption(f"Left out, not quantizable matrices: {describe_skipped(skipped)}.")
    if bad := [name for name, t in models.matrix_tensors(cached_file_tensors(path)) if not t.isfinite().all()]:
        st.warning(f"NaN or Inf values in {', '.join(bad[:4])}: these cannot be quantized; fix the file.")


def matrix_picker(matrices: list[tensors.NamedMatrix], label: str = "Layer", key: str = "layer",
                  default_role: str = "down", default_name: str | None = None) -> tensors.NamedMatrix:
    """A layer chooser; it opens on ``default_name`` when given, else on the first layer with ``default_role``."""
    names = [m.name for m in matrices]
    default = names.index(default_name) if default_name in names else next(
        (i for i, m in enumerate(matrices) if m.role == default_role), 0)
    name = st.selectbox(label, names, index=default, key=key,
                        format_func=lambda n: f"{n}  {tuple(matrices[names.index(n)].weight.shape)}")
    return matrices[names.index(name)]


# --- the sidebar -------------------------------------------------------------------------------
FORMAT_KEYS = ("sb_kind", "sb_bits", "sb_sym", "sb_gran", "sb_group", "sb_range", "sb_pct", "sb_scale_dtype")


def sidebar(format_note: str | None = None) -> None:
    """The model, the device and the current format, stored in session state for every page.

    ``format_note``: on a page that does not use the sidebar's format (it has its own controls, or its own
    list of configurations), that one line replaces the format panel, so no control there does nothing.
    """
    touch_session()  # in use: the sweep's clock restarts
    sweep_uploads()
    with st.sidebar:
        st.subheader("Model")
        label = st.selectbox("Model", MODEL_CHOICES, key="sb_model", label_visibility="collapsed")
        device = st.selectbox("Device", available_devices(), key="sb_device",
                              help="CUDA when a GPU is present, else the CPU.")
        dtype = st.selectbox("Load dtype", LOAD_DTYPES, key="sb_dtype",
                             help="auto keeps the checkpoint's dtype (bf16 checkpoints stay bf16: half of fp32's "
                                  "memory); error statistics, Hessians and scale searches run in fp32 either way.")
        choice = _model_source(label, device)
        st.session_state["_model_choice"] = None if choice is None else dataclasses.replace(choice, dtype=dtype)
        st.subheader("Quantization format")
        if format_note is None:
            st.session_state["_format"] = _format_widgets()
        else:
            _keep_format_settings()
            st.caption(format_note)


def _keep_format_settings() -> None:
    """Keep the format panel's settings through a page that does not draw it.

    Streamlit forgets a widget's value at the end of a run that did not draw the widget; written back
    as plain session state, the values are there again (and the panel as it was) on the next page
    that draws it. Only in runs that do not draw the widgets: a write in a run that does would warn.
    """
    for key in FORMAT_KEYS:
        if key in st.session_state:
            st.session_state[key] = st.session_state[key]


def _model_source(label: str, device: str) -> ModelChoice | None:
    if label == BUNDLED_LM_LABEL:
        return ModelChoice(label, models.BUNDLED_LM, device=device)
    if label == BUNDLED_ENCODER_LABEL:
        return ModelChoice(label, models.BUNDLED_ENCODER, device=device)
    policy = server_policy()
    if label == HUB_LABEL:
        st.caption("Suggested (each needs network): " + ", ".join(models.HUB_SUGGESTIONS))
        text = st.text_input("Hub id", value=models.HUB_SUGGESTIONS[0], key="sb_hub_id").strip()
        if policy.allow_remote_code:  # the operator's decision (README "Security model"), never a visitor's
            st.caption(f"Models may run their own code on this server ({REMOTE_CODE_ENV} is set by its operator).")
        if not text:
            return None
        try:
            source = allowed_source(text, policy)
        except QuantLabError as exc:
            st.error(printable(str(exc)))
            return None
        return ModelChoice(label, source, device=device, trust_remote_code=policy.allow_remote_code)
    if label == FOLDER_LABEL:
        return _local_path_choice(label, device, policy)
    return _sidebar_upload(device)


# --- uploads: the sidebar's, and a page's own (the Outliers page's "Inspect your own checkpoint") ------------
UPLOAD_HELP = "Weights only: the Model, Weights, Outliers, Clipping and Size pages read it without running a model."
PAGE_UPLOAD = "_page_upload"  # a ModelChoice uploaded on a page; the sidebar's choice until the sidebar uploads
PAGE_UPLOAD_ERROR = "_page_upload_error"


def _sidebar_upload(device: str) -> ModelChoice | None:
    """The sidebar's uploader; an upload made on a page since the sidebar's last one takes its place."""
    upload = st.file_uploader("Safetensors file", type=["safetensors"], key="sb_upload", help=UPLOAD_HELP,
                              on_change=st.session_state.pop, args=(PAGE_UPLOAD, None))
    held = st.session_state.get(PAGE_UPLOAD)
    if held is not None and Path(held.weights_path).is_file():
        st.caption(f"Inspecting {held.upload_name}, uploaded on a page (upload here to replace it).")
        return dataclasses.replace(held, device=device)
    if upload is None:
        return None
    try:
        return uploaded_choice(upload.getvalue(), upload.name, device)
    except QuantLabError as exc:
        st.error(printable(str(exc)))
        return None


def uploaded_choice(data: bytes, name: str, device: str) -> ModelChoice:
    """Saved in the session folder under its content hash; the choice keeps the name it was uploaded under."""
    path = save_upload(data, name)
    return ModelChoice(UPLOAD_LABEL, None, weights_path=str(path), device=device,
                       upload_name=uploads.display_name(name))


def page_uploader(key: str, label: str = "Safetensors file") -> None:
    """The shared upload, drawn in a page: a file given here becomes the sidebar's model choice (an upload)."""
    st.file_uploader(label, type=["safetensors"], key=key, help=UPLOAD_HELP, on_change=_take_page_upload, args=(key,))
    if error := st.session_state.pop(PAGE_UPLOAD_ERROR, None):
        st.error(error, icon="⚠️")
    elif (held := st.session_state.get(PAGE_UPLOAD)) is not None and st.session_state.get("sb_model") == UPLOAD_LABEL:
        st.caption(f"Inspecting {held.upload_name} (the sidebar's model: Upload .safetensors).")


def _take_page_upload(key: str) -> None:
    """on_change of a page's uploader, before the rerun: save the file and make it the sidebar's choice.

    A callback because the sidebar, drawn before the page, must already see the upload in this rerun, and
    only a callback may still set the sidebar's model selectbox.
    """
    upload = st.session_state.get(key)
    if upload is None:  # the user removed the file from the page's uploader
        st.session_state.pop(PAGE_UPLOAD, None)
        return
    try:
        choice = uploaded_choice(upload.getvalue(), upload.name, st.session_state.get("sb_device", "cpu"))
    except QuantLabError as exc:
        st.session_state[PAGE_UPLOAD_ERROR] = printable(str(exc))
        return
    st.session_state[PAGE_UPLOAD] = choice
    st.session_state["sb_model"] = UPLOAD_LABEL


def _local_path_choice(label: str, device: str, policy) -> ModelChoice | None:
    """A folder with config.json runs as a model; a .safetensors file, a shard index or a folder of
    bare weights opens for the weight pages, memory-mapped."""
    text = st.text_input("Folder, .safetensors file or *.safetensors.index.json", key="sb_folder",
                         help="A model folder (config.json + weights, sharded or not) runs as a model; bare "
                              "weights open for the Model, Weights, Outliers, Clipping and Size pages.").strip()
    if not text:
        return None
    try:
        path = allowed_path(text, policy)  # the one "may this path be opened" check: the operator's roots
    except QuantLabError as exc:
        st.error(printable(str(exc)))  # one message for missing and forbidden paths
        return None
    if path.is_dir() and (path / "config.json").is_file():
        return ModelChoice(label, str(path), device=device, trust_remote_code=policy.allow_remote_code)
    return ModelChoice(label, None, weights_path=str(path), device=device)


def _format_widgets() -> QuantFormat | None:
    kind = st.selectbox("Number format", FORMAT_KINDS, key="sb_kind",
                        help="Integers with a scale (and zero-point), 8-bit floats, the 16-level NF4 codebook, or "
                             "the 2026 block formats (MXFP4/6/8, NVFP4, FP8 block), whose block and scale are fixed.")
    block = kind in BLOCK_SPECS
    if block:
        st.caption(BLOCK_SPECS[kind].summary + ".")
    bits = st.slider("Bits", 2, 8, 4, key="sb_bits", disabled=kind != "int")
    symmetric = st.radio("Zero-point", ("symmetric", "asymmetric"), key="sb_sym", horizontal=True,
                         disabled=kind != "int",
                         help="Asymmetric adds an integer zero-point per scale so that the grid can sit off-centre.")
    granularity = st.radio("Scale shared by", GRANULARITIES, key="sb_gran", index=1, horizontal=True, disabled=block,
                           help="One scale per output row, per group of inputs in a row, or for the whole tensor.")
    group_size = st.selectbox("Group size", GROUP_SIZES, index=3, key="sb_group", disabled=block or granularity != "group",
                              help="How many consecutive weights share one scale: smaller groups fit better "
                                   "but store more scales.")
    method = st.selectbox("Range method", RANGE_METHODS, key="sb_range", disabled=block,
                          help="min-max keeps every value in range; percentile and MSE clip the extremes.")
    percentile = st.number_input("Percentile kept", 50.0, 100.0, 99.9, step=0.1, key="sb_pct",
                                 disabled=block or method != "percentile")
    scale_dtype = st.selectbox("Scale dtype", tuple(SCALE_DTYPES), key="sb_scale_dtype", disabled=block)
    if block:
        return QuantFormat.parse(kind)
    gran = Granularity("group", group_size) if granularity == "group" else Granularity(
        "tensor" if granularity == "per-tensor" else "channel")
    try:
        return QuantFormat(kind=kind, n_bits={"int": bits, "nf4": 4}.get(kind, 8),
                           symmetric=kind != "int" or symmetric == "symmetric", granularity=gran,
                           scale_dtype=scale_dtype, range_method=method, percentile=percentile)
    except QuantLabError as exc:
        st.error(str(exc))
        return None


def current_format() -> QuantFormat:
    """The sidebar's format; stops the page with a message when the settings do not form one."""
    fmt = st.session_state.get("_format")
    if fmt is None:
        st.warning("The format chosen in the sidebar is not valid; see the message there.")
        st.stop()
    return fmt


# --- progress ----------------------------------------------------------------------------------
def progress_callback(container=None):
    """An engine-style ``progress(fraction, message)`` that drives a progress bar in ``container``."""
    bar = (container or st).progress(0.0)

    def report(fraction: float, message: str) -> None:
        bar.progress(min(max(float(fraction), 0.0), 1.0), text=message)

    return report


# --- downloads ---------------------------------------------------------------------------------
def download_table(table: pd.DataFrame, name: str, key: str | None = None) -> None:
    """CSV and JSON download buttons for a table.

    The files are written when a button is clicked (a callable ``data``), not on every run of the page: a
    Playground step would otherwise serialize four tables twice each; and a download does not rerun the page.
    """
    left, right = st.columns(2)
    left.download_button("Download CSV", lambda: table.to_csv(index=False), f"{name}.csv", "text/csv",
                         key=f"csv-{key or name}", width="stretch", on_click="ignore")
    right.download_button("Download JSON", lambda: table.to_json(orient="records", indent=1), f"{name}.json",
                          "application/json", key=f"json-{key or name}", width="stretch", on_click="ignore")


def download_json(document, name: str, label: str = "Download JSON", key: str | None = None) -> None:
    st.download_button(label, json.dumps(document, indent=1, default=str), f"{name}.json", "application/json",
                       key=f"json-{key or name}")


GLOSSARY = {
    "scale": "the step between two neighbouring grid values; a weight x is stored as the integer round(x / scale).",
    "zero-point": "an integer offset that shifts the grid so that an asymmetric range (e.g. [-0.2, 1.0]) is covered "
                  "without wasting codes; symmetric formats have none.",
    "calibration": "running a few hundred example tokens through the model to measure activation ranges before "
                   "quantizing; no training, no labels.",
    "PTQ": "post-training quantization: convert a trained model's weights (and maybe activations) to low-bit numbers "
           "without retraining it.",
    "group size": "how many consecutive weights in a row share one scale; smaller groups follow the weights more "
                  "closely but store more scales.",
    "clipping": "choosing a range smaller than the largest |value|: the few values outside are clamped, and every "
                "other value gets a finer grid.",
    "outlier": "a weight or activation channel far larger than the rest; it stretches the scale and leaves the "
               "other values with only a few codes.",
    "bits per weight": "the stored bits divided by the number of weights, including the scales and zero-points: "
                       "INT4 with fp16 scales per 128 weights is 4 + 16/128 = 4.125.",
}


def run_warnings(results) -> None:
    """What the engine says a user must know about runs (a layer that rounded to all zeros), once each."""
    for warning in dict.fromkeys(w for result in results for w in getattr(result, "warnings", ())):
        st.warning(warning)


def explain(term: str) -> None:
    """A one-line definition of a workshop term, as a caption."""
    st.caption(f"**{term[0].upper() + term[1:]}**: {GLOSSARY[term]}")


if __name__ == "__main__":  # only Streamlit's legacy pages/ mode runs this module as a page: see pages/navigation.py
    from pages.navigation import route

    route()
