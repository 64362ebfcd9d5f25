"""The family table (qlora_rt/families.py): every row is whole, and each stage's per-family module answers to it."""

from qlora_rt.families import BY_MODEL_TYPE, BY_TASK, FAMILIES


def test_every_row_is_complete_and_model_types_belong_to_one_family():
    assert sum(len(f.model_types) for f in FAMILIES.values()) == len(BY_MODEL_TYPE)
    assert len(BY_TASK) == len(FAMILIES)  # a family trains one task, a task belongs to one family
    for f in FAMILIES.values():
        assert set(f.train_defaults) == {"batch_size", "lr", "epochs"}
        assert f.data and f.other_data and f.auto_class.startswith("AutoModelFor")


def test_each_stage_has_its_module_for_every_family():
    from qlora_rt.export.decoder_export import DecoderFamily
    from qlora_rt.export.encoder_export import EncoderFamily
    from qlora_rt.runtime import manifest
    from qlora_rt.train.tasks import TASKS

    assert set(TASKS) == set(BY_TASK)  # training
    assert {DecoderFamily.name, EncoderFamily.name} == set(FAMILIES)  # export
    for f in FAMILIES.values():  # the manifest the runtime reads
        assert manifest.TASKS[f.name] == (f.task,) and manifest.REQUIRED[f.name] == f.manifest_fields
