"""Cut a model into stages: units loaded as one byte range and executed in order.

How a model's stages are found, first match wins (docs/PACKAGE.md):

1. **declared** - the model defines ``cicada_stages(self) -> list[tuple[str, list[str]]]``:
   (stage name, module paths) in execution order. Every tensor must fall under one path.
2. **sequential** - the model is an ``nn.Sequential``: each child that holds tensors.
3. **blocks** - a list (``ModuleList``/``Sequential``) of same-class blocks holding at least
   half the weights, as in GPT-2/BERT/LLaMA/ViT: whatever comes before the blocks in
   registration order is one stage, each block is one, whatever comes after is one. A list
   with sibling lists of the same blocks (ResNet's layer1..layer4) is left to rule 4.
4. **children** - stem -> layers -> head, as in ResNet/VGG: the model's children in
   registration order, consecutive leaf modules (conv1, bn1) merged into one stage.
5. **whole** - none of the above: one stage. Correct, but nothing is pipelined.

Registration order is taken as execution order. If a model breaks that assumption the result
stays correct (a stage waits for the weights it touches), it only overlaps less.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from cicada.common.errors import StagingError

BLOCKS_MIN_SHARE = 0.5


@dataclass
class StagePlan:
    method: str
    note: str
    # (stage name, [state-dict tensor names in order])
    stages: list[tuple[str, list[str]]] = field(default_factory=list)
    modules: list[list[str]] = field(default_factory=list)


def _owner(name: str) -> str:
    return name.rpartition(".")[0]


def _under(name: str, path: str) -> bool:
    return path == "" or name == path or name.startswith(path + ".")


def plan_stages(model: nn.Module, names: list[str], nbytes: dict[str, int]) -> StagePlan:
    """Assign each stored tensor (state-dict order) to a stage."""
    declared = getattr(model, "cicada_stages", None)
    if callable(declared):
        return _declared(declared(), names)
    if isinstance(model, nn.Sequential):
        plan = _children(model, names, "sequential", merge_leaves=False)
        if plan is not None:
            return plan
    plan = _blocks(model, names, nbytes)
    if plan is not None:
        return plan
    plan = _children(model, names, "children", merge_leaves=True)
    if plan is not None:
        return plan
    return StagePlan(
        method="whole",
        note=(
            f"no stages found in {type(model).__name__}: loading it as one stage (correct, "
            "but the forward cannot start before every weight is resident). Declare stages "
            "with a cicada_stages() method; see docs/PACKAGE.md"
        ),
        stages=[("whole", list(names))],
        modules=[[""]],
    )


def _declared(spec: object, names: list[str]) -> StagePlan:
    if not isinstance(spec, (list, tuple)) or not spec:
        raise StagingError("cicada_stages() must return a non-empty list of (name, [paths])")
    stages: list[tuple[str, list[str]]] = []
    modules: list[list[str]] = []
    for entry in spec:
        if not (isinstance(entry, (list, tuple)) and len(entry) == 2):
            raise StagingError(f"cicada_stages() entry {entry!r} is not (name, [module paths])")
        stage_name, paths = entry
        stages.append((str(stage_name), []))
        modules.append([str(p) for p in paths])
    for name in names:
        # Longest matching path wins, so a stage may claim a module inside another's.
        best, best_len = None, -1
        for i, paths in enumerate(modules):
            for p in paths:
                if _under(name, p) and len(p) > best_len:
                    best, best_len = i, len(p)
        if best is None:
            raise StagingError(
                f"tensor {name} is under no module listed by cicada_stages(); add its module "
                f"({_owner(name) or '<root>'}) to a stage"
            )
        stages[best][1].append(name)
    return StagePlan("declared", "stages declared by the model", stages, modules)


def _children(
    model: nn.Module, names: list[str], method: str, merge_leaves: bool
) -> StagePlan | None:
    root, root_path = model, ""
    # Descend through wrappers that hold everything in one child (e.g. `model.model`).
    while True:
        holders = [(n, c) for n, c in root.named_children() if _holds(root_path, n, names)]
        direct = [n for n in names if _owner(n) == root_path]
        if merge_leaves and len(holders) == 1 and not direct:
            child_name, root = holders[0]
            root_path = f"{root_path}.{child_name}" if root_path else child_name
            continue
        break
    if direct:
        return None  # parameters held by the container itself: no clean cut
    groups: list[list[str]] = []  # module paths per stage
    leaf_run = False
    for child_name, child in root.named_children():
        path = f"{root_path}.{child_name}" if root_path else child_name
        if not _holds(root_path, child_name, names):
            continue
        is_leaf = not any(True for _ in child.children())
        if merge_leaves and is_leaf and leaf_run:
            groups[-1].append(path)
        else:
            groups.append([path])
        leaf_run = is_leaf
    if len(groups) < 2:
        return None
    stages: list[tuple[str, list[str]]] = []
    for i, paths in enumerate(groups):
        label = "+".join(p.rpartition(".")[2] for p in paths)
        if len(paths) > 1 and i in (0, len(groups) - 1):
            label = "stem" if i == 0 else "head"
        stages.append((label, [n for n in names if any(_under(n, p) for p in paths)]))
    note = f"children of {root_path or type(model).__name__} as stages"
    return StagePlan(method, note, stages, groups)


def _holds(parent: str, child: str, names: list[str]) -> bool:
    path = f"{parent}.{child}" if parent else child
    return any(_under(n, path) for n in names)


def _blocks(model: nn.Module, names: list[str], nbytes: dict[str, int]) -> StagePlan | None:
    total = sum(nbytes[n] for n in names) or 1
    best: tuple[int, str, list[str]] | None = None
    for path, module in model.named_modules():
        block_class = _block_class(module)
        if block_class is None or len(module) < 2:
            continue
        parent = model.get_submodule(path.rpartition(".")[0]) if path else None
        if parent is not None and any(
            sibling is not module and _block_class(sibling) is block_class
            for sibling in parent.children()
        ):
            # One of several lists of the same blocks (ResNet's layer1..layer4): the lists
            # are the stages, found by the children rule; the largest alone would leave the
            # others in one big first stage.
            continue
        children = list(module.named_children())
        block_paths = [f"{path}.{n}" if path else n for n, _ in children]
        held = sum(nbytes[n] for n in names if _under(n, path))
        if best is None or held > best[0]:
            best = (held, path, block_paths)
    if best is None or best[0] < BLOCKS_MIN_SHARE * total:
        return None
    _, list_path, block_paths = best
    pre: list[str] = []
    blocks: list[list[str]] = [[] for _ in block_paths]
    post: list[str] = []
    seen_block = False
    for name in names:
        index = next((i for i, p in enumerate(block_paths) if _under(name, p)), None)
        if index is not None:
            blocks[index].append(name)
            seen_block = True
        else:
            (post if seen_block else pre).append(name)
    stages: list[tuple[str, list[str]]] = []
    modules: list[list[str]] = []
    if pre:
        stages.append(("pre", pre))
        modules.append(_owners(pre))
    for p, tensors in zip(block_paths, blocks, strict=True):
        if tensors:
            stages.append((p, tensors))
            modules.append([p])
    if post:
        stages.append(("post", post))
        modules.append(_owners(post))
    note = f"{len(block_paths)} blocks of {list_path} as stages, with what comes before/after"
    return StagePlan("blocks", note, stages, modules)


def _block_class(module: nn.Module) -> type[nn.Module] | None:
    """The class of every child, if `module` is a list of same-class blocks."""
    if not isinstance(module, (nn.ModuleList, nn.Sequential)):
        return None
    classes = {type(c) for c in module.children()}
    return classes.pop() if len(classes) == 1 else None


def _owners(names: list[str]) -> list[str]:
    out: list[str] = []
    for n in names:
        o = _owner(n)
        if o not in out:
            out.append(o)
    return out
