"""Build ``sae_lens_vision_steer/resources/zeroshot.json``.

The file holds the class names and prompt templates used for CLIP zero-shot
classification heads. Run from the repository root:

    python scripts/build_zeroshot_resources.py [--wnids PATH] [--out PATH]

Sources:

* ImageNet-1k class names and the 80 ImageNet templates: open_clip
  (``open_clip.zero_shot_metadata``: ``IMAGENET_CLASSNAMES``,
  ``OPENAI_IMAGENET_TEMPLATES``), which copies OpenAI's cleaned list from
  CLIP's ``notebooks/Prompt_Engineering_for_ImageNet.ipynb``.
* ImageNet-1k index -> wnid: the sorted list of the 1000 synsets, as shipped
  by timm (``timm/data/_info/imagenet_synsets.txt``).
* CIFAR-100 class names and the 18 CIFAR templates: CLIP's ``data/prompts.md``
  (openai/CLIP), copied literally below.
* CUB-200-2011 class names: ``classes.txt`` of the data set, copied literally
  below, then cleaned (see ``cub_clean_name``).
"""

from __future__ import annotations

import argparse
import json
from importlib import resources
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "sae_lens_vision_steer" / "resources" / "zeroshot.json"
DEFAULT_WNIDS = REPO_ROOT.parent / "shared" / "datasets" / "tiny-imagenet-200" / "wnids.txt"

# CLIP data/prompts.md, "CIFAR100": fine labels 0..99 in label-index order.
CIFAR100_CLASSNAMES = [
    "apple", "aquarium fish", "baby", "bear", "beaver", "bed", "bee", "beetle",
    "bicycle", "bottle", "bowl", "boy", "bridge", "bus", "butterfly", "camel",
    "can", "castle", "caterpillar", "cattle", "chair", "chimpanzee", "clock",
    "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur",
    "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster",
    "house", "kangaroo", "keyboard", "lamp", "lawn mower", "leopard", "lion",
    "lizard", "lobster", "man", "maple tree", "motorcycle", "mountain", "mouse",
    "mushroom", "oak tree", "orange", "orchid", "otter", "palm tree", "pear",
    "pickup truck", "pine tree", "plain", "plate", "poppy", "porcupine",
    "possum", "rabbit", "raccoon", "ray", "road", "rocket", "rose", "sea",
    "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider",
    "squirrel", "streetcar", "sunflower", "sweet pepper", "table", "tank",
    "telephone", "television", "tiger", "tractor", "train", "trout", "tulip",
    "turtle", "wardrobe", "whale", "willow tree", "wolf", "woman", "worm",
]

# CLIP data/prompts.md, "CIFAR10"/"CIFAR100" templates (identical lists).
CIFAR_TEMPLATES = [
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a black and white photo of a {}.",
    "a low contrast photo of a {}.",
    "a high contrast photo of a {}.",
    "a bad photo of a {}.",
    "a good photo of a {}.",
    "a photo of a small {}.",
    "a photo of a big {}.",
    "a photo of the {}.",
    "a blurry photo of the {}.",
    "a black and white photo of the {}.",
    "a low contrast photo of the {}.",
    "a high contrast photo of the {}.",
    "a bad photo of the {}.",
    "a good photo of the {}.",
    "a photo of the small {}.",
    "a photo of the big {}.",
]

# CLIP data/prompts.md, "Birdsnap" (CLIP's bird template; CoOp uses it for CUB too).
CUB_TEMPLATES = ["a photo of a {}, a type of bird."]
SINGLE_TEMPLATES = ["a photo of a {}."]

# CUB_200_2011/classes.txt, class ids 1..200 (the "NNN." prefix is dropped).
CUB_RAW_CLASSES = [
    "Black_footed_Albatross", "Laysan_Albatross", "Sooty_Albatross",
    "Groove_billed_Ani", "Crested_Auklet", "Least_Auklet", "Parakeet_Auklet",
    "Rhinoceros_Auklet", "Brewer_Blackbird", "Red_winged_Blackbird",
    "Rusty_Blackbird", "Yellow_headed_Blackbird", "Bobolink", "Indigo_Bunting",
    "Lazuli_Bunting", "Painted_Bunting", "Cardinal", "Spotted_Catbird",
    "Gray_Catbird", "Yellow_breasted_Chat", "Eastern_Towhee", "Chuck_will_Widow",
    "Brandt_Cormorant", "Red_faced_Cormorant", "Pelagic_Cormorant",
    "Bronzed_Cowbird", "Shiny_Cowbird", "Brown_Creeper", "American_Crow",
    "Fish_Crow", "Black_billed_Cuckoo", "Mangrove_Cuckoo", "Yellow_billed_Cuckoo",
    "Gray_crowned_Rosy_Finch", "Purple_Finch", "Northern_Flicker",
    "Acadian_Flycatcher", "Great_Crested_Flycatcher", "Least_Flycatcher",
    "Olive_sided_Flycatcher", "Scissor_tailed_Flycatcher", "Vermilion_Flycatcher",
    "Yellow_bellied_Flycatcher", "Frigatebird", "Northern_Fulmar", "Gadwall",
    "American_Goldfinch", "European_Goldfinch", "Boat_tailed_Grackle",
    "Eared_Grebe", "Horned_Grebe", "Pied_billed_Grebe", "Western_Grebe",
    "Blue_Grosbeak", "Evening_Grosbeak", "Pine_Grosbeak", "Rose_breasted_Grosbeak",
    "Pigeon_Guillemot", "California_Gull", "Glaucous_winged_Gull", "Heermann_Gull",
    "Herring_Gull", "Ivory_Gull", "Ring_billed_Gull", "Slaty_backed_Gull",
    "Western_Gull", "Anna_Hummingbird", "Ruby_throated_Hummingbird",
    "Rufous_Hummingbird", "Green_Violetear", "Long_tailed_Jaeger",
    "Pomarine_Jaeger", "Blue_Jay", "Florida_Jay", "Green_Jay", "Dark_eyed_Junco",
    "Tropical_Kingbird", "Gray_Kingbird", "Belted_Kingfisher", "Green_Kingfisher",
    "Pied_Kingfisher", "Ringed_Kingfisher", "White_breasted_Kingfisher",
    "Red_legged_Kittiwake", "Horned_Lark", "Pacific_Loon", "Mallard",
    "Western_Meadowlark", "Hooded_Merganser", "Red_breasted_Merganser",
    "Mockingbird", "Nighthawk", "Clark_Nutcracker", "White_breasted_Nuthatch",
    "Baltimore_Oriole", "Hooded_Oriole", "Orchard_Oriole", "Scott_Oriole",
    "Ovenbird", "Brown_Pelican", "White_Pelican", "Western_Wood_Pewee",
    "Sayornis", "American_Pipit", "Whip_poor_Will", "Horned_Puffin",
    "Common_Raven", "White_necked_Raven", "American_Redstart", "Geococcyx",
    "Loggerhead_Shrike", "Great_Grey_Shrike", "Baird_Sparrow",
    "Black_throated_Sparrow", "Brewer_Sparrow", "Chipping_Sparrow",
    "Clay_colored_Sparrow", "House_Sparrow", "Field_Sparrow", "Fox_Sparrow",
    "Grasshopper_Sparrow", "Harris_Sparrow", "Henslow_Sparrow",
    "Le_Conte_Sparrow", "Lincoln_Sparrow", "Nelson_Sharp_tailed_Sparrow",
    "Savannah_Sparrow", "Seaside_Sparrow", "Song_Sparrow", "Tree_Sparrow",
    "Vesper_Sparrow", "White_crowned_Sparrow", "White_throated_Sparrow",
    "Cape_Glossy_Starling", "Bank_Swallow", "Barn_Swallow", "Cliff_Swallow",
    "Tree_Swallow", "Scarlet_Tanager", "Summer_Tanager", "Artic_Tern",
    "Black_Tern", "Caspian_Tern", "Common_Tern", "Elegant_Tern", "Forsters_Tern",
    "Least_Tern", "Green_tailed_Towhee", "Brown_Thrasher", "Sage_Thrasher",
    "Black_capped_Vireo", "Blue_headed_Vireo", "Philadelphia_Vireo",
    "Red_eyed_Vireo", "Warbling_Vireo", "White_eyed_Vireo",
    "Yellow_throated_Vireo", "Bay_breasted_Warbler", "Black_and_white_Warbler",
    "Black_throated_Blue_Warbler", "Blue_winged_Warbler", "Canada_Warbler",
    "Cape_May_Warbler", "Cerulean_Warbler", "Chestnut_sided_Warbler",
    "Golden_winged_Warbler", "Hooded_Warbler", "Kentucky_Warbler",
    "Magnolia_Warbler", "Mourning_Warbler", "Myrtle_Warbler", "Nashville_Warbler",
    "Orange_crowned_Warbler", "Palm_Warbler", "Pine_Warbler", "Prairie_Warbler",
    "Prothonotary_Warbler", "Swainson_Warbler", "Tennessee_Warbler",
    "Wilson_Warbler", "Worm_eating_Warbler", "Yellow_Warbler",
    "Northern_Waterthrush", "Louisiana_Waterthrush", "Bohemian_Waxwing",
    "Cedar_Waxwing", "American_Three_toed_Woodpecker", "Pileated_Woodpecker",
    "Red_bellied_Woodpecker", "Red_cockaded_Woodpecker", "Red_headed_Woodpecker",
    "Downy_Woodpecker", "Bewick_Wren", "Cactus_Wren", "Carolina_Wren",
    "House_Wren", "Marsh_Wren", "Rock_Wren", "Winter_Wren", "Common_Yellowthroat",
]

# Names the generic rule gets wrong: possessives (CUB drops the apostrophe),
# the two hyphenated nightjar names, and CUB's "Artic" misspelling. CUB's own
# species identities (e.g. "Cardinal", "Geococcyx", "Sayornis") are kept.
CUB_OVERRIDES = {
    "Brewer_Blackbird": "Brewer's Blackbird",
    "Chuck_will_Widow": "Chuck-will's-widow",
    "Brandt_Cormorant": "Brandt's Cormorant",
    "Heermann_Gull": "Heermann's Gull",
    "Anna_Hummingbird": "Anna's Hummingbird",
    "Clark_Nutcracker": "Clark's Nutcracker",
    "Scott_Oriole": "Scott's Oriole",
    "Whip_poor_Will": "Whip-poor-will",
    "Baird_Sparrow": "Baird's Sparrow",
    "Brewer_Sparrow": "Brewer's Sparrow",
    "Harris_Sparrow": "Harris's Sparrow",
    "Henslow_Sparrow": "Henslow's Sparrow",
    "Le_Conte_Sparrow": "Le Conte's Sparrow",
    "Lincoln_Sparrow": "Lincoln's Sparrow",
    "Nelson_Sharp_tailed_Sparrow": "Nelson's Sharp-tailed Sparrow",
    "Artic_Tern": "Arctic Tern",
    "Forsters_Tern": "Forster's Tern",
    "Swainson_Warbler": "Swainson's Warbler",
    "Wilson_Warbler": "Wilson's Warbler",
    "Bewick_Wren": "Bewick's Wren",
}


def cub_clean_name(raw: str) -> str:
    """``"Black_footed_Albatross"`` -> ``"Black-footed Albatross"``.

    A lowercase token continues a compound with the previous word
    (``"Black_and_white"`` -> ``"Black-and-white"``); a capitalised token starts
    a new word.
    """
    if raw in CUB_OVERRIDES:
        return CUB_OVERRIDES[raw]
    words: list[str] = []
    for token in raw.split("_"):
        if words and token.islower():
            words[-1] += "-" + token
        else:
            words.append(token)
    return " ".join(words)


def imagenet_wnids() -> list[str]:
    """ImageNet-1k class index -> wnid (the sorted 1000 synsets), from timm."""
    text = resources.files("timm.data").joinpath("_info/imagenet_synsets.txt").read_text()
    wnids = [line.strip() for line in text.splitlines() if line.strip()]
    assert len(wnids) == 1000 and wnids == sorted(wnids), "unexpected timm synset list"
    return wnids


def build(wnids_path: Path) -> dict:
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

    assert len(IMAGENET_CLASSNAMES) == 1000
    index_of = {w: i for i, w in enumerate(imagenet_wnids())}
    tiny_wnids = [line.strip() for line in wnids_path.read_text().splitlines() if line.strip()]
    assert len(tiny_wnids) == 200 and len(set(tiny_wnids)) == 200
    missing = [w for w in tiny_wnids if w not in index_of]
    assert not missing, f"Tiny-ImageNet wnids not in ImageNet-1k: {missing}"
    tiny = {w: IMAGENET_CLASSNAMES[index_of[w]] for w in sorted(tiny_wnids)}

    imagenet_templates = [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]
    assert len(CUB_RAW_CLASSES) == 200
    return {
        "classnames": {
            "cifar100": list(CIFAR100_CLASSNAMES),
            "cub200": [cub_clean_name(c) for c in CUB_RAW_CLASSES],
            "tiny_imagenet": tiny,
        },
        "templates": {
            "cifar": list(CIFAR_TEMPLATES),
            "imagenet": imagenet_templates,
            "cub": list(CUB_TEMPLATES),
            "single": list(SINGLE_TEMPLATES),
        },
    }


def validate(data: dict) -> None:
    names = data["classnames"]
    expected = {"cifar100": 100, "cub200": 200, "tiny_imagenet": 200}
    for key, n in expected.items():
        values = list(names[key].values()) if isinstance(names[key], dict) else names[key]
        assert len(values) == n, (key, len(values))
        assert len(set(values)) == n, f"duplicate names in {key}"
        for v in values:
            assert v and v == v.strip() and "_" not in v and "  " not in v, (key, v)
    cifar_raw_order = [n.replace(" ", "_") for n in names["cifar100"]]
    assert cifar_raw_order == sorted(cifar_raw_order), "CIFAR-100 labels are alphabetical"
    expected_t = {"cifar": 18, "imagenet": 80, "cub": 1, "single": 1}
    for key, n in expected_t.items():
        templates = data["templates"][key]
        assert len(templates) == n and len(set(templates)) == n, (key, len(templates))
        for t in templates:
            assert t.count("{}") == 1 and t.count("{") == 1 and t.count("}") == 1, (key, t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wnids", type=Path, default=DEFAULT_WNIDS)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    data = build(args.wnids)
    validate(data)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
