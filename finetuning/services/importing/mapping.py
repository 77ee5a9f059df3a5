"""The mapping language: which columns of a file make which attributes of an example.

``TARGET=COLUMN+COLUMN`` lines (``import_examples --map``) and ``KEY=VALUE`` lines (``--set``),
the mapping suggested from a file's header, and one row mapped to (attributes, description,
split).
"""

import json
import re

from finetuning.attributes import LIST_KEYS
from finetuning.services.importing.files import ImportFileError

# Target keys that are not product attributes.
EXAMPLE_KEYS = ("description", "split")
# A target written "attributes.KEY" is always an attribute, even when KEY is description or split.
ATTRIBUTE_PREFIX = "attributes."

# Header names the suggested mapping recognises for each target, best first, compared in
# their key form ("Price (INR)" -> "price_inr").
SYNONYMS = {
    "name": ("name", "product_name", "productname", "title", "product_title", "product"),
    "brand": ("brand", "product_brand", "productbrand", "manufacturer", "make"),
    "category": ("category", "product_category", "categories", "product_type", "type"),
    "color": ("color", "colour", "primary_color", "primarycolor", "primary_colour"),
    "audience": ("audience", "gender", "target_audience"),
    "price": ("price", "selling_price", "sale_price", "current_price", "list_price"),
    "currency": ("currency",),
    "features": ("features", "feature", "highlights", "bullets"),
    "keywords": ("keywords", "keyword", "tags"),
    "description": ("description", "product_description", "text", "body", "copy", "desc"),
    "split": ("split",),
}
# Joined to the category: a path such as adidas's "Women/Clothing" says who the product is for.
CATEGORY_EXTRAS = ("breadcrumbs", "breadcrumb", "category_path")
_NOT_KEY = re.compile(r"[^a-z0-9]+")
_PRICE_CURRENCY = re.compile(r"^price_([a-z]{3})$")


def lines_split(items):
    """A list of items, or a text of one item per line (the admin's text boxes)."""
    if isinstance(items, str):
        items = items.splitlines()
    return [item.strip() for item in items or () if item.strip()]


def mapping_parse(items):
    """['name=ProductName', 'category=category+breadcrumbs'] -> {'name': ['ProductName'], ...}."""
    mapping = {}
    for item in lines_split(items):
        target, sep, sources = item.partition("=")
        target, sources = target.strip().lower(), sources.strip()
        columns = [column.strip() for column in sources.split("+") if column.strip()]
        if not sep or not target or not columns:
            raise ImportFileError(f"mapping {item!r}: expected TARGET=COLUMN (or TARGET=COLUMN+COLUMN)")
        if target in mapping:
            raise ImportFileError(f"mapping {item!r}: {target} is mapped twice")
        mapping[target] = columns
    return mapping


def constants_parse(items):
    constants = {}
    for item in lines_split(items):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ImportFileError(f"constant {item!r}: expected KEY=VALUE")
        constants[key.strip().lower()] = value.strip()
    return constants


def _column_key(column):
    return _NOT_KEY.sub("_", column.strip().lower()).strip("_")


def mapping_suggest(source):
    """The mapping a curator most likely wants for a file, as (mapping lines, constant lines).
    A native JSONL file needs none. A CSV exported by this project ("attributes.KEY" columns)
    maps back to exactly what was exported."""
    if source.native:
        return [], []
    columns = source.columns
    exported = [c for c in columns if c.startswith(ATTRIBUTE_PREFIX)]
    if exported:
        lines = []
        for column in exported:
            key = column[len(ATTRIBUTE_PREFIX) :]
            lines.append(f"{column if key in EXAMPLE_KEYS else key}={column}")
        lines += [f"{key}={key}" for key in EXAMPLE_KEYS if key in columns]
        return lines, []

    by_key = {}
    for column in columns:
        by_key.setdefault(_column_key(column), column)
    used, mapping, constants = set(), {}, []
    for target, synonyms in SYNONYMS.items():
        column = next((by_key[s] for s in synonyms if s in by_key and by_key[s] not in used), None)
        if column is None and target == "price":
            # "Price (INR)": the price, and the currency it is in when no column says so.
            for key, candidate in by_key.items():
                match = _PRICE_CURRENCY.match(key)
                if match and candidate not in used:
                    column = candidate
                    if "currency" not in by_key:
                        constants.append(f"currency={match.group(1).upper()}")
                    break
        if column is None:
            continue
        used.add(column)
        mapping[target] = [column]
        if target == "category":
            extra = next((by_key[k] for k in CATEGORY_EXTRAS if k in by_key and by_key[k] not in used), None)
            if extra:
                used.add(extra)
                mapping[target].append(extra)
    return [f"{target}={'+'.join(cols)}" for target, cols in mapping.items()], constants


def value_present(value):
    return value is not None and not (isinstance(value, str) and not value.strip())


def _list_value(value):
    """A features/keywords cell: a JSON array (how export writes items that themselves hold
    ';' or '|'), or text that attributes_normalize splits on ';', '|' and new lines."""
    if isinstance(value, str) and value.strip().startswith("["):
        try:
            decoded = json.loads(value)
        except json.JSONDecodeError:
            return value
        if isinstance(decoded, list):
            return decoded
    return value


def _mapped_value(target, values):
    values = [value for value in values if value_present(value)]
    if target.removeprefix(ATTRIBUTE_PREFIX) in LIST_KEYS:
        values = [_list_value(value) for value in values]
        if len(values) > 1:  # several columns: their items, one list
            return "; ".join(str(item) for v in values for item in (v if isinstance(v, list) else [v]))
    if not values:
        return ""
    if len(values) == 1:
        # As it is: a JSONL number stays a number, a list a list.
        return values[0].strip() if isinstance(values[0], str) else values[0]
    return " / ".join(str(value).strip() for value in values)


def row_to_example(row, mapping, constants):
    """Build (attributes, description, split) from one row under a mapping (None: native JSONL)."""
    if mapping is None:
        attributes = row.get("attributes")
        attributes = dict(attributes) if isinstance(attributes, dict) else attributes
        description, split = row.get("description"), row.get("split")
    else:
        attributes, description, split = {}, "", None
        for target, columns in mapping.items():
            value = _mapped_value(target, [row.get(column) for column in columns])
            if target == "description":
                description = value
            elif target == "split":
                split = value
            else:
                attributes[target.removeprefix(ATTRIBUTE_PREFIX)] = value
    for key, value in constants.items():
        if key == "description":
            description = description or value
        elif key == "split":
            split = split or value
        elif isinstance(attributes, dict):
            attributes.setdefault(key, value)
    return attributes, description, split


def mapping_resolve(source, *, mapping_items=None, constant_items=None, suggest=True):
    """(mapping, constants, mapping lines, constant lines) for a file: the given mapping, or
    (``suggest``) the suggested one when none is given. Raises ImportFileError for a mapping
    the file cannot meet."""
    mapping_lines, constant_lines = lines_split(mapping_items), lines_split(constant_items)
    if not mapping_lines and suggest:
        mapping_lines, suggested_constants = mapping_suggest(source)
        constant_lines = constant_lines or suggested_constants
    mapping, constants = mapping_parse(mapping_lines), constants_parse(constant_lines)
    if not mapping and source.native:
        return None, constants, mapping_lines, constant_lines
    missing = sorted({column for sources in mapping.values() for column in sources} - set(source.columns))
    if missing:
        raise ImportFileError(
            f"{source.name}: column(s) {', '.join(map(repr, missing))} named in the mapping are not in the file "
            f"(columns: {', '.join(source.columns)})"
        )
    if "description" not in mapping and "description" not in constants:
        raise ImportFileError(f"{source.name}: map a column to description, e.g. description=COLUMN")
    if "name" not in mapping and "name" not in constants:
        raise ImportFileError(f"{source.name}: map a column to name, e.g. name=COLUMN")
    return mapping, constants, mapping_lines, constant_lines
