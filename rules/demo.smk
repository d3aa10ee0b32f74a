# The embedded demo: a corpus and a small trained teacher, built once and cached.


rule demo_corpus:
    output:
        corpus=str(demo_corpus_path(config)),
    log:
        str(LAYOUT.log("demo_corpus")),
    conda:
        "../envs/workflow.yaml"
    script:
        "../workflow_scripts/demo_corpus.py"


rule demo_teacher:
    input:
        corpus=rules.demo_corpus.output.corpus,
    output:
        teacher=directory(str(demo_teacher_path(config))),
    log:
        str(LAYOUT.log("demo_teacher")),
    conda:
        "../envs/workflow.yaml"
    threads: 2
    script:
        "../workflow_scripts/demo_teacher.py"
