# The embedded demo: a corpus and a small trained teacher, built once and cached.


rule demo_corpus:
    output:
        corpus=str(demo_dir(config) / "corpus.jsonl"),
    log:
        out("logs", "demo_corpus.log"),
    conda:
        "../environment.yml"
    script:
        "../workflow_scripts/demo_assets.py"


rule demo_teacher:
    input:
        corpus=rules.demo_corpus.output.corpus,
    output:
        teacher=directory(str(demo_dir(config) / "teacher")),
    log:
        out("logs", "demo_teacher.log"),
    conda:
        "../environment.yml"
    threads: 2
    script:
        "../workflow_scripts/demo_assets.py"
